"""The embedded tiny base model: tokenizer, schedule, example encoding, pretraining end to end, atomic saves,
the cache, the CLI, and (slow) the acceptance band of the default base model."""

from __future__ import annotations

import json
import math

import pytest
import torch
from transformers import AutoModelForCausalLM

from tokenmdp.cli import main
from tokenmdp.errors import TokenMDPError
from tokenmdp.atomic import write_folder
from tokenmdp.base import pretrain as pretrain_module
from tokenmdp.base import store as tiny
from tokenmdp.base.measure import group_figures, measure_base
from tokenmdp.base.pretrain import TraceStream, encode_examples, lr_at, pretrain
from tokenmdp.base.store import ensure_tiny_base
from tokenmdp.policy import tiny as tiny_model
from tokenmdp.policy.model import META_FILE, read_meta, write_meta
from tokenmdp.policy.tiny import build_char_tokenizer, load_char_tokenizer

SMALL = dict(steps=12, batch_size=8, lr=3e-3, hidden_size=32, num_layers=1, num_heads=2, train_problems=64,
             eval_problems=3, eval_k=2, progress=False)
TEXT = "Numbers: 3 5 7. Target: 56.\n<think>5+3=8\n8*7=56\n</think><answer>(5+3)*7</answer>"


def test_lr_schedule_hand_values():
    values = [lr_at(s, steps=10, lr=1.0, warmup=2) for s in (0, 1, 2, 6, 10)]
    assert values == pytest.approx([0.5, 1.0, 1.0, 0.55, 0.1])


def test_encode_examples_masks_prompt_and_padding():
    tok = build_char_tokenizer()
    ids, mask, labels = encode_examples(tok, [("ab", "c"), ("a", "")])
    a, b, c = (tok.convert_tokens_to_ids(ch) for ch in "abc")
    eos, pad = tok.eos_token_id, tok.pad_token_id
    assert ids.tolist() == [[a, b, c, eos], [a, eos, pad, pad]]
    assert mask.tolist() == [[1, 1, 1, 1], [1, 1, 0, 0]]
    assert labels.tolist() == [[-100, -100, c, eos], [-100, eos, -100, -100]]


@pytest.fixture(scope="module")
def small_base(tmp_path_factory):
    out = tmp_path_factory.mktemp("pre") / "small"
    return pretrain("countdown", out, seed=1, **SMALL)


def test_pretrain_end_to_end(small_base):
    files = {p.name for p in small_base.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", META_FILE} <= files
    meta = read_meta(small_base)
    assert meta["tokenizer"] == "char" and meta["task"] == "countdown" and meta["template"] == "compact"
    assert meta["task_kwargs"]["num_count"] == 3 and meta["task_kwargs"]["template"] == "compact"
    pre = meta["pretrain"]
    assert pre["steps"] == 12 and pre["size"] == {"hidden_size": 32, "num_layers": 1, "num_heads": 2}
    # the loss starts near log(V) (uniform over ~98 tokens) and must fall within a dozen steps
    assert pre["first_loss"] > 0.8 * math.log(98) and pre["final_loss"] < pre["first_loss"] - 0.5
    assert meta["max_new_tokens"] >= meta["trace"]["longest_completion_tokens"] + 16
    assert meta["max_new_tokens"] % 16 == 0
    assert meta["eval"]["n_problems"] == 3 and meta["eval"]["k"] == 2
    assert meta["trace"]["kind"] == "restart-search" and meta["trace"]["give_up"] == 0
    assert not [p for p in small_base.parent.iterdir() if p.name.startswith(".")]  # no temp folder left


def test_saved_folder_loads_and_round_trips(small_base):
    model = AutoModelForCausalLM.from_pretrained(small_base, dtype=torch.float32).eval()
    assert model.config.model_type == "qwen2" and model.config.hidden_size == 32
    tok = load_char_tokenizer(small_base)
    ids = tok(TEXT, add_special_tokens=False)["input_ids"]
    assert len(ids) == len(TEXT) and tok.decode(ids) == TEXT
    assert tok.padding_side == "left" and tok.eos_token == tiny_model.EOS
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits
    assert logits.shape == (1, len(TEXT), len(tok)) and torch.isfinite(logits).all()


def test_failed_save_leaves_nothing(tmp_path, monkeypatch):
    def boom(path, meta):
        (path / "partial.txt").write_text("half")
        raise RuntimeError("disk full")

    monkeypatch.setattr(pretrain_module, "write_meta", boom)
    out = tmp_path / "m"
    with pytest.raises(RuntimeError, match="disk full"):
        pretrain("countdown", out, **{**SMALL, "steps": 2, "eval_problems": 0})
    assert list(tmp_path.iterdir()) == []


def test_save_atomic_replaces_only_with_overwrite(tmp_path):
    out = tmp_path / "m"
    write_folder(out, lambda p: (p / "a").write_text("1"))
    with pytest.raises(TokenMDPError, match="already exists"):
        write_folder(out, lambda p: (p / "b").write_text("2"))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"] and (out / "a").exists()
    write_folder(out, lambda p: (p / "b").write_text("2"), replace=True)
    assert sorted(p.name for p in out.iterdir()) == ["b"] and sorted(p.name for p in tmp_path.iterdir()) == ["m"]


def test_pretrain_rejects_bad_input(tmp_path, small_base):
    with pytest.raises(TokenMDPError, match="already exists"):
        pretrain("countdown", small_base, **SMALL)
    with pytest.raises(TokenMDPError, match="gsm8k"):
        pretrain("gsm8k", tmp_path / "x", **SMALL)
    with pytest.raises(TokenMDPError, match="steps"):
        pretrain("countdown", tmp_path / "x", **{**SMALL, "steps": 0})
    with pytest.raises(TokenMDPError, match="template"):
        pretrain("countdown", tmp_path / "x", task_kwargs={"template": "r1"}, **SMALL)
    with pytest.raises(TokenMDPError, match="give_up"):
        pretrain("countdown", tmp_path / "x", give_up=1.5, **SMALL)
    with pytest.raises(TokenMDPError, match="max_failures"):
        pretrain("countdown", tmp_path / "x", max_failures=0, give_up=0.4, **SMALL)
    with pytest.raises(TokenMDPError, match="bluff"):
        pretrain("countdown", tmp_path / "x", bluff=True, **SMALL)
    with pytest.raises(TokenMDPError, match="direct"):
        pretrain("countdown", tmp_path / "x", direct=1.0, **SMALL)
    assert not (tmp_path / "x").exists()


def test_pretrain_cli_builds_other_trace_kinds(tmp_path, capsys):
    small = ["--steps", "2", "--batch-size", "4", "--hidden-size", "16", "--layers", "1", "--heads", "2",
             "--eval-problems", "0", "--quiet", "--json"]
    out = tmp_path / "give-up"
    assert main(["pretrain", "--out", str(out), *small, "--give-up", "0.4", "--max-failures", "8"]) == 0
    trace = read_meta(out)["trace"]
    assert trace["kind"] == "give-up-search" and trace["max_failures"] == 8 and trace["give_up"] == 0.4
    assert read_meta(out)["pretrain"]["settings"]["give_up"] == 0.4
    assert main(["pretrain", "--out", str(tmp_path / "bluff"), *small, "--give-up", "0.4", "--bluff"]) == 0
    assert read_meta(tmp_path / "bluff")["trace"]["kind"] == "bluff-search"
    assert main(["pretrain", "--out", str(tmp_path / "direct"), *small, "--direct", "0.6", "--max-failures", "4"]) == 0
    meta = read_meta(tmp_path / "direct")
    assert meta["trace"]["kind"] == "restart-search" and meta["trace"]["direct"] == 0.6
    assert meta["pretrain"]["settings"]["direct"] == 0.6
    capsys.readouterr()
    assert main(["pretrain", "--out", str(tmp_path / "bad"), *small, "--give-up", "1"]) == 2
    assert "give_up" in capsys.readouterr().err and not (tmp_path / "bad").exists()


def test_ensure_tiny_base_finds_or_builds(tmp_path, monkeypatch):
    for key, value in SMALL.items():
        if key in tiny.BASE_SETTINGS:
            monkeypatch.setitem(tiny.BASE_SETTINGS, key, value)
    monkeypatch.setitem(tiny.BASE_EVAL, "eval_problems", 0)
    monkeypatch.setenv("TOKENMDP_CACHE", str(tmp_path / "cache"))
    path = ensure_tiny_base(progress=False)
    assert path == tmp_path / "cache" / tiny.BASE_NAME and (path / META_FILE).is_file()
    assert read_meta(path)["pretrain"]["settings"] == tiny.BASE_SETTINGS
    stamp = (path / "model.safetensors").stat().st_mtime_ns
    assert ensure_tiny_base(progress=False) == path  # found, not rebuilt
    assert (path / "model.safetensors").stat().st_mtime_ns == stamp
    meta = read_meta(path)  # a folder written before the give_up and bluff settings existed is still current
    for key in tiny.TRACE_DEFAULTS:
        del meta["pretrain"]["settings"][key]
    write_meta(path, meta)
    assert ensure_tiny_base(progress=False) == path
    assert (path / "model.safetensors").stat().st_mtime_ns == stamp
    monkeypatch.setitem(tiny.BASE_SETTINGS, "steps", 3)  # the defaults changed: the stale cache is rebuilt
    assert ensure_tiny_base(progress=False) == path
    assert read_meta(path)["pretrain"]["steps"] == 3
    assert sorted(p.name for p in path.parent.iterdir()) == [f".{tiny.BASE_NAME}.lock", tiny.BASE_NAME]
    stray = tmp_path / "other" / tiny.BASE_NAME
    stray.mkdir(parents=True)
    with pytest.raises(TokenMDPError, match="no tokenmdp.json"):
        ensure_tiny_base(tmp_path / "other", progress=False)


def test_group_figures_hand_computed():
    figs = group_figures([1, 0, 1, 1, 0, 0, 0, 1], k=2)
    assert figs == {"sampled_accuracy": 0.5, "mixed_fraction": 0.5, "all_correct_fraction": 0.25,
                    "all_wrong_fraction": 0.25, "pass_at_2": 0.75}
    with pytest.raises(TokenMDPError, match="k=3"):
        group_figures([1, 0, 1, 1], k=3)


def test_measure_base(small_base):
    figs = measure_base(small_base, n_problems=4, k=3, seed=0, max_new_tokens=24)
    assert figs["n_problems"] == 4 and figs["k"] == 3
    for key in ("sampled_accuracy", "greedy_accuracy", "mixed_fraction", "format_rate", "truncated_rate"):
        assert 0.0 <= figs[key] <= 1.0
    # the values themselves: the same completions (the held-out evaluation, same problems and seed) scored again
    # here by the task's verifier, and the rates counted by hand
    from tokenmdp.train.heldout import evaluate

    meta = read_meta(small_base)
    task = tiny_model_task(meta)
    problems = task.problems("test", n=4, seed=0)
    model = AutoModelForCausalLM.from_pretrained(str(small_base), dtype=torch.float32).eval()
    records = evaluate(model, load_char_tokenizer(small_base), task, problems, k=3, max_new_tokens=24, seed=0,
                       template=meta.get("template", "compact"), batch_size=64 * 3)["records"]
    scores = [[task.score(p, s["completion"]) for s in r["samples"]] for p, r in zip(problems, records)]
    counts = [sum(sc.correct for sc in row) for row in scores]
    samples = [s for r in records for s in r["samples"]]
    assert figs["sampled_accuracy"] == pytest.approx(sum(counts) / 12, abs=1e-4)
    assert figs["mixed_fraction"] == pytest.approx(sum(0 < c < 3 for c in counts) / 4, abs=1e-4)
    assert figs["all_correct_fraction"] == pytest.approx(sum(c == 3 for c in counts) / 4, abs=1e-4)
    assert figs["format_rate"] == pytest.approx(sum(sc.formatted for row in scores for sc in row) / 12, abs=1e-4)
    assert figs["truncated_rate"] == pytest.approx(sum(s["truncated"] for s in samples) / 12, abs=1e-4)
    assert all(s["truncated"] == (s["length"] == 24) for s in samples)  # cut only at the token limit
    greedy = [task.score(p, r["greedy"]["completion"]).correct for p, r in zip(problems, records)]
    assert figs["greedy_accuracy"] == pytest.approx(sum(greedy) / 4, abs=1e-4)
    total = figs["mixed_fraction"] + figs["all_correct_fraction"] + figs["all_wrong_fraction"]
    assert total == pytest.approx(1.0)
    assert 0 < figs["mean_length"] <= 24
    with pytest.raises(TokenMDPError, match="tokenmdp.json"):
        measure_base(small_base.parent, n_problems=2)


def tiny_model_task(meta):
    from tokenmdp.tasks import get_task

    return get_task(meta["task"], **meta.get("task_kwargs", {}))


def test_cli_pretrain(tmp_path, small_base, capsys):
    out = tmp_path / "cli"
    args = ["pretrain", "--out", str(out), "--steps", "3", "--batch-size", "4", "--hidden-size", "32", "--layers",
            "1", "--heads", "2", "--eval-problems", "0", "--quiet", "--json"]
    assert main(args) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["path"] == str(out) and doc["pretrain"]["steps"] == 3 and doc["eval"] is None
    assert (out / META_FILE).is_file()
    assert main(args) == 2  # exists, no --overwrite
    assert "already exists" in capsys.readouterr().err
    assert main(["pretrain", "--out", str(small_base), "--eval", "--eval-problems", "2", "--k", "2", "--quiet",
                 "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["eval"]["n_problems"] == 2 and doc["eval"]["k"] == 2 and doc["pretrain"]["steps"] == 12
    assert main(["pretrain", "--out", str(small_base), "--eval-problems", "3", "--k", "2", "--quiet", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["eval"]["n_problems"] == 3  # --eval-problems alone implies --eval
    assert main(["pretrain", "--task", "gsm8k", "--out", str(tmp_path / "g")]) == 2
    assert "gsm8k" in capsys.readouterr().err
    assert main(["pretrain", "--out", str(tmp_path / "t"), "--task-arg", "nonsense"]) == 2
    assert main(["pretrain", "--help"]) == 0


@pytest.mark.slow
def test_default_base_model_in_acceptance_band(tmp_path):
    """A rebuild of the embedded base model with the default settings (what `tokenmdp pretrain` does) leaves
    room for RL, and so does the shipped copy: the band of 15-60% held-out sampled accuracy at temperature 1 and
    at least half of the groups of 8 mixed (measured on the default build: see benchmarks/RESULTS.md, "Tiny base
    model")."""
    rebuilt = pretrain("countdown", tmp_path / tiny.BASE_NAME, progress=False, eval_problems=0, **tiny.BASE_SETTINGS)
    shipped = ensure_tiny_base(progress=False)
    for path in (rebuilt, shipped):
        figs = measure_base(path, n_problems=256, k=8, seed=1)
        print(path, figs)
        assert 0.15 <= figs["sampled_accuracy"] <= 0.60, figs
        assert figs["mixed_fraction"] >= 0.5, figs
        assert figs["format_rate"] >= 0.9, figs
    same = (rebuilt / "model.safetensors").read_bytes() == (shipped / "model.safetensors").read_bytes()
    print("rebuild bitwise equal to the shipped weights:", same)


def test_trace_stream_groups_batches_by_length():
    from tokenmdp.tasks import get_task

    task = get_task("countdown", template="compact", num_count=3, high=20)
    stream = TraceStream(task, task.problems("train", n=10, seed=0), seed=0, max_failures=2)
    batches = [stream.batch(s, 4, group=3) for s in range(3)]
    expected = [stream.example(k) for k in range(12)]  # example k: problem k % 10, trace seeded by k
    assert sorted(ex for b in batches for ex in b) == sorted(expected)
    lengths = [[len(p) + len(c) for p, c in b] for b in batches]
    spans = sorted((min(x), max(x)) for x in lengths)
    assert all(hi1 <= lo2 for (_, hi1), (lo2, _) in zip(spans, spans[1:]))  # sorted into length bands
    assert stream.batch(1, 4, group=3) == batches[1]  # deterministic
    assert stream.example(3)[0] == stream.example(13)[0]  # example k cycles over the problems


def test_ensure_tiny_base_builds_once_when_asked_concurrently(tmp_path, monkeypatch):
    import threading

    for key, value in SMALL.items():
        if key in tiny.BASE_SETTINGS:
            monkeypatch.setitem(tiny.BASE_SETTINGS, key, value)
    monkeypatch.setitem(tiny.BASE_EVAL, "eval_problems", 0)
    calls, real = [], tiny.pretrain

    def counting(*args, **kw):
        calls.append(1)
        return real(*args, **kw)

    monkeypatch.setattr(tiny, "pretrain", counting)
    results: list = []
    threads = [threading.Thread(target=lambda: results.append(ensure_tiny_base(tmp_path, progress=False)))
               for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(calls) == 1 and results == [tmp_path / tiny.BASE_NAME] * 3
