"""Chat-tuning jobs through the API (issue 12): ``chat``, ``chat_data`` and ``init_from_model`` are
validated with the field named, another user's dataset or model answers 404, a conversations upload must
look like conversations, and the plan covers both stages."""

from __future__ import annotations

import gzip
import io
import json
import re

import pytest
from conftest import client_as

from nanochat_studio.models import Model, TrainingJob
from test_jobs_api import fake_calibrator, post_json

CONVERSATION = {"messages": [{"role": "user", "content": "Who found the key?"},
                             {"role": "assistant", "content": "Mia found the key."}]}
CHATS = ("\n".join(json.dumps(CONVERSATION) for _ in range(20)) + "\n").encode()


@pytest.fixture(autouse=True)
def _no_background_calibration(app):
    fake_calibrator(app)


def upload(client, name: str, data: bytes) -> dict:
    page = client.get("/train").get_data(as_text=True)
    token = re.search(r'name="csrf-token" content="([^"]+)"', page).group(1)
    r = client.post("/api/datasets", data={"file": (io.BytesIO(data), name)}, headers={"X-CSRFToken": token},
                    content_type="multipart/form-data")
    assert r.status_code == 201, r.get_json()
    return r.get_json()


def base_model(user, **fields) -> Model:
    return Model.create(user=user, name="base", checkpoint_key="users/1/models/1/checkpoints/step_0000008",
                        tokenizer_key="t", config={"depth": 3, "max_steps": 8}, **fields)


def refused(client, body: dict, status: int, param: str, words: str) -> None:
    r = post_json(client, "/api/jobs", body)
    assert r.status_code == status, r.get_json()
    error = r.get_json()["error"]
    assert error.get("param") == param and words in error["message"], error
    assert TrainingJob.select().count() == 0


@pytest.mark.parametrize("body, param, words", [
    ({"depth": 1, "dataset": "demo", "chat": "yes"}, "chat", "'chat' must be true or false"),
    ({"depth": 1, "dataset": "demo", "chat": True, "chat_data": "demo"}, "chat_data", "not both"),
    ({"depth": 1, "dataset": "demo", "chat_data": "ftp://example.org/x.jsonl"}, "chat_data", "is not a dataset"),
    ({"depth": 1, "dataset": "demo", "chat_data": "http://127.0.0.1/chats.jsonl"}, "chat_data", ""),
    ({"depth": 1, "dataset": "demo", "chat_steps": 10}, "chat_steps", "needs a chat stage"),
    ({"depth": 1, "dataset": "demo", "chat": True, "chat_steps": 0}, "chat_steps", "between 1 and"),
    ({"depth": 1, "dataset": "demo", "chat": True, "chat_steps": "5"}, "chat_steps", "must be an integer"),
    ({"chat": True}, "depth", "'depth' is required"),
    ({"depth": 1, "dataset": {"source": "s3://a/b", "credentials": {"key": "k", "secret": "s"}},
      "chat_data": {"source": "s3://a/c", "credentials": {"key": "k2", "secret": "s2"}}}, "chat_data", "one set"),
])
def test_bad_chat_settings_answer_400_naming_the_field(app, alice, body, param, words):
    refused(client_as(app, alice), body, 400, param, words)


def test_chat_true_is_the_demo_conversations_after_pretraining_and_the_plan_has_both_stages(app, alice):
    c = client_as(app, alice)
    r = post_json(c, "/api/jobs", {"depth": 1, "dataset": "demo", "max_steps": 40, "chat": True})
    assert r.status_code == 201, r.get_json()
    job = r.get_json()
    assert job["config"] == {"depth": 1, "dataset": "demo", "max_steps": 40, "chat_data": "demo"}
    est = job["estimate"]
    pre, chat = est["stages"]
    assert pre == {**pre, "stage": "pretrain", "steps": 40} and chat["stage"] == "chat" and chat["steps"] > 0
    assert est["steps"] == 40 + chat["steps"]  # what the trainer's start event reports as total_steps
    assert est["time"]["breakdown"]["chat"] > 0


def test_a_conversations_upload_is_chat_data_and_other_files_are_refused_with_the_reason(app, alice):
    c = client_as(app, alice)
    chats = upload(c, "chats.jsonl", CHATS)
    zipped = upload(c, "chats.jsonl.gz", gzip.compress(CHATS))
    text = upload(c, "stories.txt", b"Once upon a time. " * 50)
    prose = upload(c, "prose.jsonl", b'{"text": "a document, not a conversation"}\n' * 5)
    broken = upload(c, "broken.jsonl", b"{not json\n")
    for ds in (chats, zipped):
        r = post_json(c, "/api/jobs", {"depth": 1, "dataset": "demo", "chat_data": ds["spec"]})
        assert r.status_code == 201, r.get_json()
        assert r.get_json()["config"]["chat_data"] == ds["spec"]
    TrainingJob.delete().execute()
    refused(c, {"depth": 1, "dataset": "demo", "chat_data": text["spec"]}, 400, "chat_data", "a .jsonl file")
    refused(c, {"depth": 1, "dataset": "demo", "chat_data": prose["spec"]}, 400, "chat_data",
            'line 1: no "messages" list')
    refused(c, {"depth": 1, "dataset": "demo", "chat_data": broken["spec"]}, 400, "chat_data", "line 1: not JSON")


def test_another_users_conversations_or_model_are_not_found(app, alice, charlie):
    chats = upload(client_as(app, alice), "chats.jsonl", CHATS)
    model = base_model(alice)
    c = client_as(app, charlie)
    refused(c, {"depth": 1, "dataset": "demo", "chat_data": chats["spec"]}, 404, "chat_data", "no dataset")
    refused(c, {"init_from_model": model.id, "chat": True}, 404, "init_from_model", f"no model {model.id}")
    refused(c, {"init_from_model": "12abc", "chat": True}, 404, "init_from_model", "no model")
    refused(c, {"init_from_model": 10**30, "chat": True}, 404, "init_from_model", "no model")


def test_chat_tuning_a_model_takes_its_shape_and_refuses_pretraining_settings(app, alice):
    c = client_as(app, alice)
    model = base_model(alice)
    refused(c, {"init_from_model": model.id}, 400, "init_from_model", "add 'chat': true")
    refused(c, {"init_from_model": model.id, "chat": True, "dataset": "demo"}, 400, "dataset", "does not apply")
    refused(c, {"init_from_model": model.id, "chat": True, "depth": 3}, 400, "depth", "does not apply")
    refused(c, {"init_from_model": model.id, "chat": True, "max_steps": 9}, 400, "max_steps", "use 'chat_steps'")
    shapeless = Model.create(user=alice, name="old", checkpoint_key="k", tokenizer_key="t", config={})
    refused(c, {"init_from_model": shapeless.id, "chat": True}, 400, "init_from_model", "does not record the depth")
    chats = upload(c, "chats.jsonl", CHATS)
    r = post_json(c, "/api/jobs", {"init_from_model": model.id, "chat_data": chats["spec"], "chat_steps": 12})
    assert r.status_code == 201, r.get_json()
    job = r.get_json()
    assert job["config"] == {"init_from_model": model.id, "chat_data": chats["spec"], "chat_steps": 12, "depth": 3}
    assert [s["stage"] for s in job["estimate"]["stages"]] == ["chat"]
    assert job["estimate"]["steps"] == 12
    assert c.get(f"/jobs/{job['id']}").status_code == 200  # the page of a job with no pretraining data


def csrf(client, url: str) -> str:
    return re.search(r'name="csrf_token" value="([^"]+)"', client.get(url).get_data(as_text=True)).group(1)


def test_the_plan_page_chat_tunes_the_demo_job_by_default_and_on_chosen_conversations(app, alice):
    c = client_as(app, alice)
    html = c.get("/train").get_data(as_text=True)
    assert re.search(r'<input id="chat" type="checkbox" name="chat" value="on" checked', html)
    token = csrf(c, "/train")
    r = c.post("/train", data={"csrf_token": token, "depth": "1", "source": "demo", "max_steps": "5", "chat": "on",
                               "chat_data": "demo"})
    assert r.status_code == 302
    assert TrainingJob.get().config["chat_data"] == {"kind": "demo", "source": "demo"}
    chats = upload(c, "chats.jsonl", CHATS)
    r = c.post("/train", data={"csrf_token": token, "depth": "1", "source": "demo", "max_steps": "5", "chat": "on",
                               "chat_data": str(chats["id"])})
    assert r.status_code == 302
    assert TrainingJob.select().order_by(TrainingJob.id.desc()).get().config["chat_data"]["source"] == chats["spec"]
    assert f'<option value="{chats["id"]}"' in c.get("/train").get_data(as_text=True)  # offered as conversations
    r = c.post("/train", data={"csrf_token": token, "depth": "1", "source": "demo", "max_steps": "5"})
    assert r.status_code == 302 and "chat_data" not in TrainingJob.select().order_by(TrainingJob.id.desc()).get().config
    prose = upload(c, "prose.jsonl", b'{"text": "x"}\n')
    r = c.post("/train", data={"csrf_token": token, "depth": "1", "source": "demo", "chat": "on",
                               "chat_data": str(prose["id"])})
    assert r.status_code == 400 and "no &#34;messages&#34; list" in r.get_data(as_text=True)


def test_chat_tune_this_model_from_its_page(app, alice):
    c = client_as(app, alice)
    model = base_model(alice, data_source="demo")
    page = c.get(f"/models/{model.id}").get_data(as_text=True)
    assert "Chat-tune this model" in page and 'class="badge kind-base">base<' in page
    assert "kind-base" in c.get("/models").get_data(as_text=True)
    token = csrf(c, f"/models/{model.id}")
    assert c.post(f"/models/{model.id}/chat-tune", data={"chat_data": "demo"}).status_code == 400  # no CSRF token
    r = c.post(f"/models/{model.id}/chat-tune", data={"csrf_token": token, "chat_data": "demo"})
    assert r.status_code == 302, r.get_data(as_text=True)[:500]
    job = TrainingJob.get()
    assert job.name == "base (chat)" and job.config["init_from_model"] == model.id
    assert job.config["chat_data"] == {"kind": "demo", "source": "demo"} and "dataset" not in job.config
    show = c.get(r.headers["Location"]).get_data(as_text=True)
    assert f"chat-tunes <a href=\"/models/{model.id}\">model #{model.id}</a>" in show
    bad = c.post(f"/models/{model.id}/chat-tune", data={"csrf_token": token, "chat_data": "nonsense"})
    assert bad.status_code == 400 and "Choose the conversations" in bad.get_data(as_text=True)
    chat_model = base_model(alice, kind="chat")
    page = c.get(f"/models/{chat_model.id}").get_data(as_text=True)
    assert "Chat-tune this model" not in page and 'class="badge kind-chat">chat<' in page
