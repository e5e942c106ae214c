"""lm-eval against a real `loramux serve`: a small multiple-choice task run
through lm-eval's `local-completions` (remote tokenizer over /tokenizer_info,
/tokenize and /detokenize; echo + logprobs completions) scores an adapter
exactly as lm-eval's `hf` model with `peft=` does; and echo + logprobs, and
vLLM's prompt_logprobs, through the official openai client equal transformers
+ PEFT's log_softmax of the prompt."""
from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoTokenizer

from helpers.live_server import BASE, KEY, serve_with_adapters
from helpers.tiny import make_adapter, make_chat_model, peft_model

TASK = "loramux_tiny_mc"
PROMPT = "The capital of France is Paris, and the capital of Italy is"
# float32 on both sides, summed over a few tokens of logprobs near -11 each
TOL = dict(atol=2e-4, rtol=1e-5)

DOCS = [
    ("What colour is the sky?", ["blue", "green", "red"], 0),
    ("How many legs has a cat?", ["two", "four", "six", "eight"], 1),
    ("Which is a fruit?", ["carrot", "potato", "apple"], 2),
    ("What do bees make?", ["honey", "milk", "silk"], 0),
    ("Which planet is the largest?", ["Mars", "Jupiter", "Venus"], 1),
    ("What is frozen water?", ["steam", "sand", "ice"], 2),
    ("Which animal barks?", ["dog", "fish", "owl"], 0),
    ("What is 2 + 2?", ["three", "four", "five"], 1),
    ("Which season is coldest?", ["summer", "spring", "winter"], 2),
    ("What do you read?", ["a book", "a spoon", "a shoe"], 0),
]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("lm_eval")
    make_chat_model(root / "base")
    make_adapter(root / "base", root / "ad", r=8, alpha=16, seed=1)
    return root


@pytest.fixture(scope="module")
def server(files):
    s = serve_with_adapters(files / "base", files / "store", {"ad": files / "ad"})
    yield s
    s.stop()


@pytest.fixture(scope="module")
def tok(files):
    return AutoTokenizer.from_pretrained(files / "base")


@pytest.fixture(scope="module")
def ref(files):
    return peft_model(files / "base", files / "ad")


def reference_logprobs(ref, ids: list[int]) -> torch.Tensor:
    """[P, V] log_softmax of transformers + PEFT's logits; row j scores token j + 1."""
    with torch.no_grad():
        x = torch.tensor([ids])
        return torch.log_softmax(ref(input_ids=x, attention_mask=torch.ones_like(x)).logits[0].float(), -1)


def write_task(folder) -> None:
    """A multiple_choice task over a local JSONL file (no hub)."""
    data = folder / "docs.jsonl"
    data.write_text("".join(json.dumps({"question": q, "choices": c, "label": a}) + "\n" for q, c, a in DOCS))
    (folder / f"{TASK}.yaml").write_text(
        f"task: {TASK}\n"
        "dataset_path: json\n"
        f"dataset_kwargs:\n  data_files:\n    test: {data}\n"
        "test_split: test\n"
        "output_type: multiple_choice\n"
        'doc_to_text: "Question: {{question}}\\nAnswer:"\n'
        "doc_to_choice: choices\n"
        "doc_to_target: label\n"
        "metric_list:\n  - metric: acc\n"
    )


@pytest.mark.slow
def test_local_completions_scores_an_adapter_as_hf_with_peft(server, files, tmp_path, monkeypatch):
    import lm_eval
    from lm_eval.models.openai_completions import LocalCompletionsAPI
    from lm_eval.tasks import TaskManager

    import datasets.config
    import huggingface_hub.constants

    # no hub: the variables for anything that reads them later, the flags their readers took at import
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_OFFLINE", True)
    monkeypatch.setenv("OPENAI_API_KEY", KEY)  # local-completions' Authorization header
    write_task(tmp_path)

    tasks = TaskManager(include_path=str(tmp_path), include_defaults=False)  # lm-eval's own thousands: not indexed

    def evaluate(model, **options):
        out = lm_eval.simple_evaluate(model=model, tasks=[TASK], task_manager=tasks, log_samples=True, batch_size=1,
                                      **options)
        samples = sorted(out["samples"][TASK], key=lambda s: s["doc_id"])
        return out["results"][TASK]["acc,none"], [[r[0] for r in s["resps"]] for s in samples]

    remote = LocalCompletionsAPI(model="ad", base_url=server.url + "/v1/completions", auth_token=KEY,
                                 max_retries=1)  # tokenizer_backend "auto", tokenized_requests as by default
    assert remote.tokenizer_backend == "remote" and remote.tokenized_requests  # it found /tokenizer_info
    served_acc, served = evaluate(remote)
    hf_acc, hf = evaluate("hf", model_args={"pretrained": str(files / "base"), "peft": str(files / "ad"),
                                           "dtype": "float32", "device": "cpu"})
    assert len(served) == len(DOCS) and [len(s) for s in served] == [len(c) for _, c, _ in DOCS]
    torch.testing.assert_close(torch.tensor([ll for s in served for ll, _ in s], dtype=torch.float64),
                               torch.tensor([float(ll) for s in hf for ll, _ in s], dtype=torch.float64), **TOL)
    assert [[g for _, g in s] for s in served] == [[bool(g) for _, g in s] for s in hf]
    assert served_acc == hf_acc


def test_tokenizer_info_is_what_lm_evals_remote_tokenizer_reads(server, tok):
    from lm_eval.utils import RemoteTokenizer

    info = server.http.get("/tokenizer_info").json()
    assert (info["eos_token"], info["bos_token"], info["pad_token"]) == (tok.eos_token, tok.bos_token, tok.pad_token)
    assert info["chat_template"] == tok.chat_template and info["tokenizer_class"] == type(tok).__name__
    assert not any(k.endswith("_file") or k == "name_or_path" for k in info)  # no server paths
    remote = RemoteTokenizer(server.url + "/v1/completions", auth_token=KEY)
    assert remote.eos_token_id == tok.eos_token_id and remote.bos_token_id == tok.bos_token_id
    assert remote.encode(PROMPT) == tok.encode(PROMPT, add_special_tokens=False)
    assert remote.decode(tok.encode(PROMPT)) == PROMPT
    chat = [{"role": "user", "content": "Hi"}]
    assert remote.apply_chat_template(chat) == tok.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
    assert server.http.get("/tokenizer_info", headers={"Authorization": "Bearer wrong"}).status_code == 401


def assert_echo_logprobs_equal_reference(choice, ids: list[int], lp: torch.Tensor, tok, prompt_text: str,
                                         num_top: int) -> None:
    got = choice.logprobs
    n = len(ids)
    assert choice.text.startswith(prompt_text) and got.tokens[:n] == [tok.decode([t]) for t in ids]
    assert got.token_logprobs[0] is None and got.top_logprobs[0] is None
    want = [float(lp[j - 1, ids[j]]) for j in range(1, n)]
    torch.testing.assert_close(torch.tensor(got.token_logprobs[1:n]), torch.tensor(want), atol=1e-4, rtol=1e-4)
    for j in range(1, n):  # the prompt token first, then the most likely: num_top + 1 at most
        top = got.top_logprobs[j]
        best = torch.topk(lp[j - 1], num_top).indices.tolist()
        assert list(top)[0] == got.tokens[j] and set(top) == {got.tokens[j], *(tok.decode([t]) for t in best)}
    # the offsets index the returned text, prompt tokens then generated ones
    assert all(choice.text[o:o + len(t)] == t for o, t in zip(got.text_offset, got.tokens))
    assert got.text_offset[0] == 0 and "".join(got.tokens) == choice.text


def test_echo_with_logprobs_equals_peft_over_the_openai_client(server, ref, tok):
    ids = tok.encode(PROMPT)
    lp = reference_logprobs(ref, ids)
    r = server.openai.completions.create(model="ad", prompt=PROMPT, max_tokens=3, temperature=0, echo=True,
                                         logprobs=2, extra_body={"ignore_eos": True})
    choice = r.choices[0]
    assert len(choice.logprobs.tokens) == len(ids) + 3 and r.usage.prompt_tokens == len(ids)
    assert_echo_logprobs_equal_reference(choice, ids, lp, tok, PROMPT, 2)
    plain = server.openai.completions.create(model="ad", prompt=PROMPT, max_tokens=3, temperature=0, logprobs=2,
                                             extra_body={"ignore_eos": True}).choices[0]
    assert choice.text == PROMPT + plain.text and choice.logprobs.tokens[len(ids):] == plain.logprobs.tokens
    assert choice.logprobs.token_logprobs[len(ids):] == plain.logprobs.token_logprobs

    # vLLM's prompt_logprobs ride along: {str(id): {logprob, rank, decoded_token}}, the prompt token first
    plp = choice.model_extra["prompt_logprobs"]
    assert plp[0] is None and len(plp) == len(ids)
    for j in range(1, len(ids)):
        first = next(iter(plp[j].items()))
        assert first[0] == str(ids[j]) and first[1]["decoded_token"] == tok.decode([ids[j]])
        best = torch.topk(lp[j - 1], 2).indices.tolist()
        assert set(map(int, plp[j])) == {ids[j], *best}
        assert all(plp[j][str(t)]["rank"] == i + 1 for i, t in enumerate(best))
        if ids[j] not in best:
            assert first[1]["rank"] == int((lp[j - 1] >= lp[j - 1, ids[j]]).sum())

    # token-id prompts echo their decoded text; streamed, the echo is the first chunk
    stream = server.openai.completions.create(model="ad", prompt=ids, max_tokens=3, temperature=0, echo=True,
                                              logprobs=2, stream=True, extra_body={"ignore_eos": True})
    chunks = [c.choices[0] for c in stream if c.choices]
    assert chunks[0].text.startswith(tok.decode(ids)) and len(chunks[0].logprobs.tokens) == len(ids) + 1
    assert "".join(c.text for c in chunks) == choice.text
    for field in ("tokens", "token_logprobs", "top_logprobs", "text_offset"):
        assert [v for c in chunks for v in getattr(c.logprobs, field)] == getattr(choice.logprobs, field), field

    # max_tokens 0 with echo: the prompt alone, as vLLM returns it
    only = server.openai.completions.create(model="ad", prompt=PROMPT, max_tokens=0, echo=True, logprobs=1)
    assert only.choices[0].text == PROMPT and len(only.choices[0].logprobs.tokens) == len(ids)
    assert_echo_logprobs_equal_reference(only.choices[0], ids, lp, tok, PROMPT, 1)


def test_prompt_logprobs_on_chat_and_their_refusals(server, ref, tok):
    messages = [{"role": "user", "content": "Name a colour."}]
    ids = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    ids = list(ids["input_ids"] if hasattr(ids, "keys") else ids)
    r = server.http.post("/v1/chat/completions", json={"model": "ad", "messages": messages, "max_tokens": 1,
                                                       "prompt_logprobs": 1})
    assert r.status_code == 200, r.text
    plp = r.json()["prompt_logprobs"]
    lp = reference_logprobs(ref, ids)
    assert len(plp) == len(ids) and plp[0] is None
    torch.testing.assert_close(torch.tensor([plp[j][str(ids[j])]["logprob"] for j in range(1, len(ids))]),
                               torch.stack([lp[j - 1, ids[j]] for j in range(1, len(ids))]), atol=1e-4, rtol=1e-4)
    base = {"model": BASE, "prompt": PROMPT, "max_tokens": 2}
    for body, param in [({"prompt_logprobs": 21}, "prompt_logprobs"), ({"prompt_logprobs": -1}, "prompt_logprobs"),
                        ({"prompt_logprobs": 1, "stream": True}, None), ({"max_tokens": 0}, "max_tokens")]:
        r = server.http.post("/v1/completions", json={**base, **body})
        assert r.status_code == 400 and r.json()["error"]["param"] == param, (body, r.text)
    without = server.http.post("/v1/completions", json=base).json()["choices"][0]
    assert without["prompt_logprobs"] is None and without["logprobs"] is None
