"""The Files API (/v1/files...) for fine-tuning data: the store on disk
(atomic, restart-proof), the training-file validation, and the routes over
real HTTP, driven by the official openai client and httpx."""
from __future__ import annotations

import json
import os
import socket
from pathlib import Path

import httpx
import openai
import pytest

from helpers.live_server import KEY, Server, assert_error, post_endless_multipart
from helpers.tiny import make_chat_model
from loramux.adapters_store.file_store import FileStore, clean_filename
from loramux.server.errors import NotFound, TooLarge
from loramux.server.finetune.data import ChatRow, CompletionRow, TrainingDataError, Turn, parse_training_jsonl

FILE_CAP = 64 * 1024  # the module server's --max-file-bytes


def jsonl(*rows) -> bytes:
    return "".join(json.dumps(r) + "\n" for r in rows).encode()


CHAT = {"messages": [{"role": "system", "content": "Be brief."},
                     {"role": "user", "content": "Capital of France?"},
                     {"role": "assistant", "content": "Paris."}]}
COMPLETION = {"prompt": "2 + 2 =", "completion": " 4"}
TRAINING = jsonl(CHAT, COMPLETION)


# ---------------------------------------------------------------------------
# parse_training_jsonl
# ---------------------------------------------------------------------------

def test_both_row_formats_parse_into_their_dataclasses_with_default_weights():
    data = jsonl(
        {"messages": [{"role": "system", "content": "s"},
                      {"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]},
                      {"role": "assistant", "content": "context", "weight": 0},
                      {"role": "user", "content": "again"},
                      {"role": "assistant", "content": "learned"},
                      {"role": "assistant", "content": "also learned", "weight": 1}]},
        COMPLETION,
    ) + b"\n   \n"  # blank lines are skipped
    rows = parse_training_jsonl(data)
    assert rows == [
        ChatRow((Turn("system", "s", 0), Turn("user", "ab", 0), Turn("assistant", "context", 0),
                 Turn("user", "again", 0), Turn("assistant", "learned", 1), Turn("assistant", "also learned", 1))),
        CompletionRow("2 + 2 =", " 4"),
    ]


def test_a_utf8_bom_and_crlf_line_ends_are_accepted():
    assert parse_training_jsonl(b"\xef\xbb\xbf" + TRAINING.replace(b"\n", b"\r\n")) == parse_training_jsonl(TRAINING)


# (what, the file's lines, the 1-based line refused, words the message holds)
MALFORMED = [
    ("bad JSON", [CHAT, '{"messages": ['], 2, "not valid JSON"),
    ("unknown role", [CHAT, COMPLETION, {"messages": [{"role": "bot", "content": "hi"},
                                                       {"role": "assistant", "content": "x"}]}], 3,
     "unknown role 'bot'"),
    ("no assistant turn", [{"messages": [{"role": "user", "content": "hi"}]}], 1, "no assistant turn to learn from"),
    ("only weight-0 assistant turns", [CHAT, {"messages": [{"role": "user", "content": "hi"},
                                                            {"role": "assistant", "content": "x", "weight": 0}]}], 2,
     "no assistant turn to learn from"),
    ("weight on a user turn", [{"messages": [{"role": "user", "content": "hi", "weight": 1},
                                             {"role": "assistant", "content": "x"}]}], 1,
     "`weight` is allowed on assistant turns only"),
    ("weight 2", [CHAT, {"messages": [{"role": "user", "content": "hi"},
                                      {"role": "assistant", "content": "x", "weight": 2}]}], 2,
     "`weight` must be 0 or 1, got 2"),
    ("assistant first", [CHAT, {"messages": [{"role": "assistant", "content": "Hello!"},
                                              {"role": "user", "content": "hi"}]}], 2,
     "cannot be a conversation's first message"),
    ("empty completion", [COMPLETION, {"prompt": "p", "completion": ""}], 2, "`completion` is empty"),
    ("tools", [{**CHAT, "tools": []}], 1, "`tools`: tool-calling fine-tuning is not supported"),
    ("not an object", [[1, 2]], 1, "must be a JSON object"),
    ("not UTF-8", [CHAT, b"\xff\xfe"], 2, "not UTF-8"),
]


def _lines(lines) -> bytes:
    return b"".join((line if isinstance(line, bytes) else
                     (line if isinstance(line, str) else json.dumps(line)).encode()) + b"\n" for line in lines)


@pytest.mark.parametrize("what,lines,line,words", MALFORMED, ids=[m[0] for m in MALFORMED])
def test_a_malformed_line_is_refused_naming_its_line(what, lines, line, words):
    with pytest.raises(TrainingDataError) as info:
        parse_training_jsonl(_lines(lines))
    assert info.value.message.startswith(f"line {line}: "), info.value.message
    assert words in info.value.message
    assert info.value.param == "file" and info.value.line == line


def test_blank_lines_count_in_line_numbers_and_an_empty_file_is_refused():
    with pytest.raises(TrainingDataError, match=r"^line 3: "):
        parse_training_jsonl(jsonl(CHAT) + b"\n" + b"{oops\n")
    for empty in (b"", b"\n \n"):
        with pytest.raises(TrainingDataError, match="no rows"):
            parse_training_jsonl(empty)


# ---------------------------------------------------------------------------
# FileStore
# ---------------------------------------------------------------------------

def test_store_round_trip_and_restart(tmp_path):
    store = FileStore(tmp_path / "files", 1024)
    a = store.save("../../etc/passwd", "fine-tune", b"one")
    b = store.save("C:\\data\\train.jsonl", "fine-tune", b"two!")
    assert (a.filename, b.filename) == ("passwd", "train.jsonl")
    assert a.id.startswith("file-") and len(a.id) == 29 and a.bytes == 3
    again = FileStore(tmp_path / "files", 1024)  # a restart: the folder is the state
    assert again.get(a.id) == a and again.content_path(b.id).read_bytes() == b"two!"
    assert again.list(order="asc") == ([a, b], False)
    assert again.delete(a.id) and not again.delete(a.id)
    with pytest.raises(NotFound):
        again.get(a.id)
    assert again.list() == ([b], False)


def test_store_ids_are_checked_before_they_touch_a_path(tmp_path):
    store = FileStore(tmp_path / "files", 1024)
    (tmp_path / "secret").write_text("x")
    for bad in ("../secret", "file-../../secret", "FILE-" + "a" * 24, "file-" + "a" * 23, ".tmp-x"):
        with pytest.raises(NotFound):
            store.get(bad)
        with pytest.raises(NotFound):
            store.content_path(bad)
        assert store.delete(bad) is False
    assert (tmp_path / "secret").exists()


def test_store_refuses_above_its_cap_and_keeps_filenames_as_metadata(tmp_path):
    store = FileStore(tmp_path / "files", 4)
    with pytest.raises(TooLarge):
        store.save("x.jsonl", "fine-tune", b"12345")
    assert list((tmp_path / "files").iterdir()) == []
    assert clean_filename("a/b\\c\x00d\n.jsonl") == "cd.jsonl"
    assert clean_filename("dir/") == "file"
    assert len(clean_filename("x" * 1000)) == 255


def test_a_crash_mid_save_leaves_nothing_visible_and_its_temp_folder_is_cleaned(tmp_path, monkeypatch):
    root = tmp_path / "files"
    store = FileStore(root, 1024)
    kept = store.save("kept.jsonl", "fine-tune", b"kept")

    def crash(src, dst):
        raise OSError("power cut")

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(OSError, match="power cut"):
        store.save("lost.jsonl", "fine-tune", b"lost")
    monkeypatch.undo()
    assert sorted(p.name for p in root.iterdir()) == [kept.id]
    # a crash harder than an exception leaves its temp folder behind, content and meta.json complete
    left = root / ".tmp-crashed"
    left.mkdir()
    (left / "content").write_bytes(b"half")
    (left / "meta.json").write_text(json.dumps({"filename": "x", "purpose": "fine-tune", "bytes": 4,
                                                "created_ns": 1}))
    assert store.list() == ([kept], False)  # never listed
    FileStore(root, 1024)  # the next start removes it
    assert sorted(p.name for p in root.iterdir()) == [kept.id]


def test_store_pages_in_creation_order(tmp_path):
    store = FileStore(tmp_path / "files", 1024)
    made = [store.save(f"{i}.jsonl", "fine-tune", b"x") for i in range(5)]
    other = store.save("o.jsonl", "other", b"x")
    assert store.list(purpose="fine-tune", order="asc") == (made, False)
    assert store.list(order="desc")[0] == [other, *reversed(made)]
    assert store.list(purpose="fine-tune", order="asc", limit=2) == (made[:2], True)
    assert store.list(purpose="fine-tune", order="asc", after=made[1].id, limit=2) == (made[2:4], True)
    assert store.list(purpose="fine-tune", order="asc", after=made[3].id, limit=2) == (made[4:], False)
    assert store.list(purpose="fine-tune", order="desc", after=made[2].id) == ([made[1], made[0]], False)
    with pytest.raises(NotFound):
        store.list(after="file-" + "0" * 24)


# ---------------------------------------------------------------------------
# over HTTP
# ---------------------------------------------------------------------------

@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return make_chat_model(tmp_path_factory.mktemp("files-model") / "base")


def start(model: Path, root: Path, *extra: str) -> Server:
    return Server(model, root / "adapters", "--data-dir", str(root), *extra)


@pytest.fixture(scope="module")
def server_root(tmp_path_factory):
    return tmp_path_factory.mktemp("files-api")


@pytest.fixture(scope="module")
def server(model, server_root):
    s = start(model, server_root, "--max-file-bytes", str(FILE_CAP))
    yield s
    s.stop()


def stored(root: Path) -> list[str]:
    """Every entry of the server's file store folder (temp folders included)."""
    return sorted(p.name for p in (root / "files").iterdir())


def test_create_list_retrieve_content_delete_round_trip(server, server_root):
    client = server.openai
    made = client.files.create(file=("train.jsonl", TRAINING), purpose="fine-tune")
    assert made.object == "file" and made.purpose == "fine-tune" and made.status == "processed"
    assert made.filename == "train.jsonl" and made.bytes == len(TRAINING) and made.id.startswith("file-")
    assert client.files.retrieve(made.id) == made
    assert made.id in [f.id for f in client.files.list()]
    assert client.files.content(made.id).read() == TRAINING
    assert made.id in stored(server_root)
    deleted = client.files.delete(made.id)
    assert (deleted.id, deleted.object, deleted.deleted) == (made.id, "file", True)
    assert made.id not in stored(server_root)
    for call in (client.files.retrieve, client.files.content, client.files.delete):
        with pytest.raises(openai.NotFoundError):
            call(made.id)


def test_pagination_with_after_and_limit(server):
    client = server.openai
    mine = [client.files.create(file=(f"p{i}.jsonl", TRAINING), purpose="fine-tune").id for i in range(5)]
    everything = [f.id for f in client.files.list(order="asc")]
    assert [i for i in everything if i in mine] == mine  # creation order
    assert [f.id for f in client.files.list(order="desc")] == everything[::-1]
    first = client.files.list(order="asc", limit=2)
    assert len(first.data) == 2 and first.has_more
    # the client's own paging follows `after` through every page
    assert [f.id for f in client.files.list(order="asc", limit=2)] == everything
    page = server.http.get("/v1/files", params={"order": "asc", "after": mine[1], "limit": 2}).json()
    assert [f["id"] for f in page["data"]] == everything[everything.index(mine[1]) + 1:][:2]
    assert (page["object"], page["first_id"], page["last_id"]) == ("list", page["data"][0]["id"],
                                                                    page["data"][1]["id"])
    last = server.http.get("/v1/files", params={"order": "asc", "after": everything[-2]}).json()
    assert [f["id"] for f in last["data"]] == everything[-1:] and last["has_more"] is False
    assert server.http.get("/v1/files", params={"purpose": "batch"}).json()["data"] == []
    for bad in ({"limit": 0}, {"limit": 10001}, {"limit": "ten"}, {"order": "newest"}):
        [(name, _)] = bad.items()
        assert_error(server.http.get("/v1/files", params=bad), 400, name)
    assert_error(server.http.get("/v1/files", params={"after": "file-" + "0" * 24}), 404, "after")


@pytest.mark.parametrize("what,lines,line,words", MALFORMED, ids=[m[0] for m in MALFORMED])
def test_a_malformed_training_file_is_400_naming_the_line(server, server_root, what, lines, line, words):
    before = stored(server_root)
    with pytest.raises(openai.BadRequestError) as info:
        server.openai.files.create(file=("bad.jsonl", _lines(lines)), purpose="fine-tune")
    err = assert_error(info.value.response, 400, "file")
    assert err["message"].startswith(f"line {line}: ") and words in err["message"], err
    assert err["code"] == "invalid_training_file"
    assert stored(server_root) == before  # nothing stored


def test_wrong_purpose_and_unsupported_fields_are_400(server, server_root):
    before = stored(server_root)
    with pytest.raises(openai.BadRequestError) as info:
        server.openai.files.create(file=("t.jsonl", TRAINING), purpose="batch")
    assert_error(info.value.response, 400, "purpose")
    r = server.http.post("/v1/files", files={"file": ("t.jsonl", TRAINING)})
    assert_error(r, 400, "purpose")
    r = server.http.post("/v1/files", data={"purpose": "fine-tune"})
    assert_error(r, 400, "file")
    r = server.http.post("/v1/files", json={"purpose": "fine-tune"})
    assert_error(r, 400, "file")
    with pytest.raises(openai.BadRequestError) as info:
        server.openai.files.create(file=("t.jsonl", TRAINING), purpose="fine-tune",
                                   expires_after={"anchor": "created_at", "seconds": 3600})
    assert "never expire" in assert_error(info.value.response, 400)["message"]
    assert stored(server_root) == before


def _chunked_upload(port: int, body: bytes, boundary: str) -> tuple[int, dict]:
    """POST /v1/files with `body` sent chunked (no Content-Length): the server
    learns the size only by counting; (status, JSON body)."""
    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        sock.sendall((f"POST /v1/files HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {KEY}\r\n"
                      f"Content-Type: multipart/form-data; boundary={boundary}\r\n"
                      "Transfer-Encoding: chunked\r\nConnection: close\r\n\r\n").encode())
        for i in range(0, len(body), 64 * 1024):
            chunk = body[i:i + 64 * 1024]
            sock.sendall(f"{len(chunk):x}\r\n".encode() + chunk + b"\r\n")
        sock.sendall(b"0\r\n\r\n")
        reply = b""
        while data := sock.recv(65536):
            reply += data
    head, payload = reply.split(b"\r\n\r\n", 1)
    return int(head.split()[1]), json.loads(payload)


def test_an_oversized_file_is_413_and_leaves_nothing_behind(server, server_root):
    before = stored(server_root)
    row = json.dumps(CHAT).encode() + b"\n"
    # over the cap by less than the form's framing, and malformed: the size is refused before the rows are read
    just_over = row * (FILE_CAP // len(row)) + b"{" * len(row)
    far_over = row * (3 * FILE_CAP // len(row))  # its Content-Length alone is refused
    for data in (just_over, far_over):
        with pytest.raises(openai.APIStatusError) as info:
            server.openai.files.create(file=("big.jsonl", data), purpose="fine-tune")
        err = assert_error(info.value.response, 413, "file")
        assert err["code"] == "file_too_large" and str(FILE_CAP) in err["message"]
    boundary = "xYz"
    body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"purpose\"\r\n\r\nfine-tune\r\n"
            f"--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"big.jsonl\"\r\n\r\n"
            ).encode() + far_over + f"\r\n--{boundary}--\r\n".encode()
    status, reply = _chunked_upload(server.port, body, boundary)
    assert status == 413 and reply["error"]["code"] == "file_too_large", reply
    assert stored(server_root) == before  # no file, no .tmp- folder
    at_cap = row * (FILE_CAP // len(row))
    made = server.openai.files.create(file=("at-cap.jsonl", at_cap), purpose="fine-tune")
    assert made.bytes == len(at_cap) <= FILE_CAP


def test_every_files_route_needs_the_api_key(server):
    no_key = httpx.Client(base_url=server.url, timeout=30)
    made = server.openai.files.create(file=("t.jsonl", TRAINING), purpose="fine-tune")
    for method, path in (("POST", "/v1/files"), ("GET", "/v1/files"), ("GET", f"/v1/files/{made.id}"),
                         ("GET", f"/v1/files/{made.id}/content"), ("DELETE", f"/v1/files/{made.id}")):
        assert_error(no_key.request(method, path), 401)
    wrong = openai.OpenAI(base_url=server.url + "/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        wrong.files.create(file=("t.jsonl", TRAINING), purpose="fine-tune")
    assert server.openai.files.retrieve(made.id).id == made.id  # still there


def test_files_survive_a_restart(model, tmp_path):
    first = start(model, tmp_path)
    try:
        kept = first.openai.files.create(file=("kept.jsonl", TRAINING), purpose="fine-tune")
        gone = first.openai.files.create(file=("gone.jsonl", TRAINING), purpose="fine-tune")
        first.openai.files.delete(gone.id)
    finally:
        assert first.stop() == 0
    second = start(model, tmp_path)
    try:
        assert [f.id for f in second.openai.files.list()] == [kept.id]
        assert second.openai.files.retrieve(kept.id) == kept
        assert second.openai.files.content(kept.id).read() == TRAINING
    finally:
        second.stop()


def test_the_file_cap_not_the_request_cap_bounds_an_upload_and_is_counted_as_it_streams(model, tmp_path):
    s = start(model, tmp_path, "--max-file-bytes", str(FILE_CAP), "--max-request-bytes", str(FILE_CAP // 4))
    try:
        row = json.dumps(CHAT).encode() + b"\n"
        data = row * (FILE_CAP // len(row))  # 4x --max-request-bytes, under --max-file-bytes
        assert s.openai.files.create(file=("t.jsonl", data), purpose="fine-tune").bytes == len(data)
        assert_error(s.http.post("/v1/completions", content=b"x" * FILE_CAP), 413)  # other routes keep theirs
        # no Content-Length, and the body never ends: the server can only answer if it counts as it reads
        boundary = "xYz"
        head = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"purpose\"\r\n\r\nfine-tune\r\n"
                f"--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"big.jsonl\"\r\n\r\n"
                ).encode()
        status, body = post_endless_multipart(s.port, "/v1/files", boundary, head,
                                              [row * 64] * (2 * FILE_CAP // (64 * len(row)) + 2))
        assert status == 413 and body["error"]["code"] == "file_too_large"
        assert len(stored(tmp_path)) == 1  # the first file only: no temp folder
    finally:
        s.stop()
