"""OpenAIJudge against a canned OpenAI-compatible server on 127.0.0.1 (nothing else is contacted).

The key travels only from the environment variable named by ``api_key_env`` to the
Authorization header: never into configs, reprs, summaries or curated records.
"""

from __future__ import annotations

import json
import math
import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from chat_server import ChatServer, chat, local_only

from unveil.judges import build_judge
from unveil.judges.openai_compat import OpenAIJudge, parse_score

KEY = "sk-unveil-test-0123456789abcdef"
ENV = "UNVEIL_TEST_JUDGE_KEY"


class Canned:
    """What the server answers, and what it saw."""

    def __init__(self):
        self.replies: list[tuple[int, object]] = []  # (status, body) consumed in order; last one repeats
        self.requests: list[dict] = []


@pytest.fixture
def server(monkeypatch):
    local_only(monkeypatch)
    canned = Canned()

    def answer(body):
        status, reply = canned.replies.pop(0) if len(canned.replies) > 1 else canned.replies[0]
        return status, reply, 0.0

    srv = ChatServer(answer)
    canned.requests, canned.url = srv.requests, srv.url
    yield canned
    srv.close()


def judge_for(server, **kw) -> OpenAIJudge:
    return build_judge(
        {
            "_target_": "unveil.judges.openai_compat.OpenAIJudge",
            "model": "grader-1",
            "base_url": server.url,
            "api_key_env": ENV,
            "timeout_s": 5,
            "backoff": 0.01,
            **kw,
        }
    )


def test_parse_score():
    assert parse_score("7") == 0.7 and parse_score("Score: 8/10") == 0.8 and parse_score("85/100") == 0.85
    assert parse_score(" 7.5 out of 10.") == 0.75 and parse_score("10") == 1.0
    assert math.isnan(parse_score("banana")) and math.isnan(parse_score("42")) and math.isnan(parse_score(None))


def test_key_comes_from_the_environment_and_never_shows(server, monkeypatch):
    monkeypatch.setenv(ENV, KEY)
    server.replies = [(200, chat("Score: 8/10"))]
    judge = judge_for(server)
    assert judge.score("Is there a mass?", "Mass in the left lung.", "Left lung mass.") == pytest.approx(0.8)
    req = server.requests[0]
    assert req["path"] == "/v1/chat/completions" and req["headers"]["Authorization"] == f"Bearer {KEY}"
    body = req["body"]
    assert body["model"] == "grader-1" and body["temperature"] == 0.0
    assert "Left lung mass." in body["messages"][-1]["content"] and KEY not in json.dumps(body)
    # nothing a run would log holds the key
    for shown in (repr(judge), str(judge), json.dumps(judge.config()), json.dumps(vars(judge), default=str)):
        assert KEY not in shown
    assert judge.config()["api_key_env"] == ENV


def test_batch_in_parallel_keeps_order(server, monkeypatch):
    monkeypatch.setenv(ENV, KEY)
    server.replies = [(200, chat("3"))]
    items = [("q", "ref", f"answer {i}") for i in range(6)]
    assert judge_for(server, max_workers=3).score_batch(items) == [pytest.approx(0.3)] * 6
    assert sorted(
        r["body"]["messages"][-1]["content"].split("Answer to grade: ")[1].split("\n")[0] for r in server.requests
    ) == [f"answer {i}" for i in range(6)]


def test_failures_give_nan_and_never_raise(server, monkeypatch):
    monkeypatch.delenv(ENV, raising=False)
    server.replies = [(500, {"error": "boom"})]
    judge = judge_for(server, retries=2)
    assert math.isnan(judge.score("q", "r", "a"))
    assert len(server.requests) == 3  # one try + two retries on a 5xx
    assert all("Authorization" not in r["headers"] for r in server.requests)  # no key set: no header
    server.requests.clear()
    server.replies = [(401, {"error": "bad key"})]
    assert math.isnan(judge.score("q", "r", "a")) and len(server.requests) == 1  # 4xx: no retry
    server.replies = [(200, "not json at all")]
    assert math.isnan(judge.score("q", "r", "a"))
    server.replies = [(200, {"choices": []})]
    assert math.isnan(judge.score("q", "r", "a"))
    server.replies = [(200, chat("I cannot grade this."))]
    assert math.isnan(judge.score("q", "r", "a"))
    server.replies = [(429, {"error": "slow down"}), (200, chat("9"))]
    server.requests.clear()
    assert judge.score("q", "r", "a") == pytest.approx(0.9) and len(server.requests) == 2  # retried after 429
    # nobody listening
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    dead = OpenAIJudge(
        model="m", base_url=f"http://127.0.0.1:{port}/v1", api_key_env=ENV, retries=1, backoff=0.01, timeout_s=2
    )
    assert all(math.isnan(x) for x in dead.score_batch([("q", "r", "a")] * 2))


def test_a_literal_key_is_refused_without_echoing_it():
    with pytest.raises(ValueError) as e:
        OpenAIJudge(model="m", api_key_env=KEY)
    assert KEY not in str(e.value)


def test_curate_with_the_http_judge_keeps_the_key_out_of_every_file(server, monkeypatch, synthetic_dir, tmp_path):
    """relevance weights from the HTTP judge through the real config: scores land in the records,
    the key in no written file."""
    from hydra import compose, initialize_config_dir

    from unveil.curate.__main__ import curate

    monkeypatch.setenv(ENV, KEY)
    server.replies = [(200, chat("6"))]
    root = Path(__file__).resolve().parents[1]
    pairs, out = tmp_path / "pairs", tmp_path / "weighted"
    with initialize_config_dir(config_dir=str(root / "conf"), version_base="1.3"):
        base = [
            f"data.root={synthetic_dir}",
            "data.synthetic=null",
            "progress=false",
            "build_splits=[train]",
            "passthrough=false",
            "max_samples=5",
        ]
        curate(
            compose("curate", overrides=[*base, "builder=hallucination", "builder.sampler=rules", f"out_dir={pairs}"])
        )
        judge = (
            f"{{_target_:unveil.judges.openai_compat.OpenAIJudge,model:grader-1,base_url:'{server.url}',"
            f"api_key_env:{ENV},timeout_s:5}}"
        )
        cfg = compose(
            "curate",
            overrides=[
                f"data.root={pairs}",
                "data=mau_jsonl",
                "progress=false",
                "build_splits=[train]",
                "passthrough=false",
                "builder=relevance_weights",
                f"out_dir={out}",
                f"builder.judges=[{judge}]",
            ],
        )
    from omegaconf import OmegaConf

    assert KEY not in OmegaConf.to_yaml(cfg)
    summary = curate(cfg)
    assert summary["splits"]["train"]["written"] == 5
    recs = [json.loads(line) for line in (out / "train.jsonl").read_text().splitlines()]
    assert all(
        r["weight"] == pytest.approx(0.6) and r["weight_rounds"] == 2 for r in recs
    )  # one judge, agrees with itself
    # two rounds per pair, the second a cache hit (same judge, same content): one request per pair
    assert len(server.requests) == 5 and all(r["headers"]["Authorization"] == f"Bearer {KEY}" for r in server.requests)
    for f in out.rglob("*"):
        if f.is_file() and f.suffix in (".json", ".jsonl", ".yaml", ".log", ".txt"):
            assert KEY not in f.read_text(errors="ignore"), f


def _serve(handler_cls):
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), handler_cls)
    threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
    return httpd


@pytest.mark.parametrize("code", [301, 302, 303, 307, 308])
def test_a_redirect_to_another_host_gets_neither_the_key_nor_the_request(server, monkeypatch, code):
    """The endpoint answers with a redirect to a second local server (another origin): the judge
    follows no redirect, so the second server never sees the key (urllib would re-send it) and its
    reply never becomes a score; the item scores NaN."""
    monkeypatch.setenv(ENV, KEY)
    seen: list[dict] = []

    class Elsewhere(BaseHTTPRequestHandler):
        def _record(self):
            seen.append({"method": self.command, "headers": dict(self.headers)})
            data = json.dumps(chat("10")).encode()
            self.send_response(200)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        do_GET = do_POST = _record  # noqa: N815

        def log_message(self, *args):
            pass

    other = _serve(Elsewhere)
    target = f"http://localhost:{other.server_address[1]}/v1/chat/completions"  # another host name and port

    class Redirect(BaseHTTPRequestHandler):
        def do_POST(self):  # noqa: N802
            self.rfile.read(int(self.headers.get("Content-Length", 0)))
            self.send_response(code)
            self.send_header("Location", target)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, *args):
            pass

    first = _serve(Redirect)
    try:
        server.url = f"http://127.0.0.1:{first.server_address[1]}/v1"
        score = judge_for(server, retries=0).score("q", "ref", "answer")
    finally:
        first.shutdown(), other.shutdown()
        first.server_close(), other.server_close()
    assert math.isnan(score)
    assert seen == []  # not even a request without the key: nothing reaches the other host
