"""What a restarted `loramux serve` serves: the adapters its store holds
(uploads and merges), minus deletions; adapters loaded by path
(/v1/load_lora_adapter) are not stored and do not come back (README documents
nothing either way); a stored adapter that no longer checks out (its meta.json
hash, a new --max-lora-rank, a broken folder) is skipped, the rest load."""
from __future__ import annotations

import json

import pytest

from helpers.live_server import Server, assert_error, assert_serving, make_api_files, upload_dir
from helpers.tiny import make_adapter

PROMPT = "The quick brown fox"


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = make_api_files(tmp_path_factory.mktemp("restart"))  # allowed/a1 (r=8), allowed/a2 (r=4, q,v)
    make_adapter(root / "base", root / "allowed" / "a3", r=4, alpha=4, seed=3, target_modules=("q_proj", "v_proj"))
    make_adapter(root / "base", root / "allowed" / "r16", r=16, alpha=16, seed=4)
    return root


def outputs(server, names):
    return {m: server.openai.completions.create(model=m, prompt=PROMPT, max_tokens=6, temperature=0,
                                                extra_body={"ignore_eos": True}).choices[0].text for m in names}


@pytest.mark.slow
def test_a_restart_serves_what_the_store_holds(files, tmp_path):
    store = tmp_path / "store"
    allowed = files / "allowed"
    s = Server(files / "base", store, "--allowed-adapter-root", str(allowed))
    try:
        for name, folder in (("a1", "a1"), ("a2", "a2"), ("a3", "a3"), ("big", "r16"), ("gone", "a1"),
                             ("tampered", "a2")):
            assert upload_dir(s.http, name, allowed / folder).status_code == 201
        r = s.http.post("/v1/adapters/merge", json={"name": "merged", "method": "concat", "sources": [
            {"adapter": "a2", "weight": 0.5}, {"adapter": "a3", "weight": -0.7}]})
        assert r.status_code == 201 and r.json()["rank"] == 8, r.text
        r = s.http.post("/v1/load_lora_adapter", json={"lora_name": "by-path", "lora_path": str(allowed / "a3")})
        assert r.status_code == 200 and r.json()["source"] == "path", r.text
        assert s.http.delete("/v1/adapters/gone").status_code == 200
        kept = ("a1", "a2", "a3", "merged")
        before = outputs(s, kept)
        assert len(set(before.values())) == len(kept)
        infos = {a["name"]: a for a in s.http.get("/v1/adapters").json()["data"]}
    finally:
        assert s.stop() == 0
    assert sorted(p.name for p in store.iterdir()) == ["a1", "a2", "a3", "big", "merged", "tampered"]
    # a meta.json whose hash no longer matches the weights
    meta = json.loads((store / "tampered" / "meta.json").read_text())
    (store / "tampered" / "meta.json").write_text(json.dumps({**meta, "sha256": "0" * 64}))
    # what a crash mid-upload leaves, and a folder that no longer validates
    (store / ".tmp-crashed").mkdir()
    (store / ".tmp-crashed" / "adapter_config.json").write_text("{}")
    (store / "broken").mkdir()
    (store / "broken" / "adapter_config.json").write_text("{")
    (store / "broken" / "adapter_model.safetensors").write_bytes(b"junk")

    s = Server(files / "base", store, "--max-lora-rank", "8")  # big (r=16) is above it now
    try:
        assert s.http.get("/v1/adapters").json()["data"] == [infos[n] for n in kept]
        assert outputs(s, kept) == before
        for name in ("gone", "by-path", "tampered", "big", "broken"):
            assert_error(s.http.get(f"/v1/adapters/{name}"), 404)
            assert_error(s.http.post("/v1/completions", json={"model": name, "prompt": PROMPT}), 404, "model")
        # skipped, not deleted: they load again once they check out
        assert (store / "tampered").is_dir() and (store / "big").is_dir()
        assert not (store / ".tmp-crashed").exists()
        assert_serving(s)
    finally:
        s.stop()
