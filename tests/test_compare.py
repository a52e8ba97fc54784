"""`tokenmdp compare`: the fairness check on logged prompt streams (against crafted run folders), settings
validation, and (when the trainer is there) an end-to-end comparison of 2 algorithms x 1 seed x 3 steps on a locally
built tiny model that produces every file, with a report table holding the numbers of summary.csv."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

from tokenmdp.errors import TokenMDPError
from tokenmdp.experiments.compare.run import FairnessError, check_same_stream


def write_samples(run_dir: Path, steps: list[list[str]], group: int = 2) -> Path:
    run_dir.mkdir(parents=True, exist_ok=True)
    rows = {"step": [], "prompt": [], "completion": []}
    for i, prompts in enumerate(steps, start=1):
        for p in prompts:
            for _ in range(group):
                rows["step"].append(i)
                rows["prompt"].append(p)
                rows["completion"].append("x")
    pq.write_table(pa.table(rows), run_dir / "samples.parquet")
    return run_dir


STREAM = [["a", "b"], ["c", "d"], ["e", "a"]]


def test_same_stream_passes_and_reports(tmp_path):
    runs = {algo: write_samples(tmp_path / algo, STREAM) for algo in ("grpo", "isft+")}
    summary = check_same_stream(runs, STREAM)
    assert summary == {"algos": ["grpo", "isft+"], "steps": 3, "identical": True, "prompts_per_step": [2],
                       "samples_per_step": [4]}


@pytest.mark.parametrize(
    "other,group,match",
    [
        ([["a", "b"], ["c", "x"], ["e", "a"]], 2, "step 2: rloo and grpo saw different batches: prompts differ"),
        (STREAM, 3, "step 1: rloo and grpo saw different batches: sample counts differ"),
        (STREAM[:2], 2, "rloo logged steps"),
    ],
)
def test_different_streams_are_caught(tmp_path, other, group, match):
    runs = {"grpo": write_samples(tmp_path / "grpo", STREAM), "rloo": write_samples(tmp_path / "rloo", other, group)}
    with pytest.raises(FairnessError, match=match):
        check_same_stream(runs)


def test_stream_must_match_the_seeds_prompt_stream(tmp_path):
    runs = {"grpo": write_samples(tmp_path / "grpo", STREAM), "rloo": write_samples(tmp_path / "rloo", STREAM)}
    with pytest.raises(FairnessError, match="step 3: the logged prompts are not those"):
        check_same_stream(runs, [["a", "b"], ["c", "d"], ["e", "f"]])
    with pytest.raises(TokenMDPError, match="samples.parquet not found"):
        check_same_stream({"grpo": tmp_path / "empty"})


def test_bad_settings_are_user_errors(tmp_path):
    from tokenmdp.experiments.compare import compare

    with pytest.raises(TokenMDPError, match="unknown algorithm 'nope'"):
        compare(["grpo", "nope"], 1, model=str(tmp_path), out=tmp_path / "o")
    with pytest.raises(TokenMDPError, match="listed twice"):
        compare(["grpo", "grpo"], 1, model=str(tmp_path), out=tmp_path / "o")
    with pytest.raises(TokenMDPError, match="--eval-n must be at least 1"):
        compare(["grpo"], 1, model=str(tmp_path), out=tmp_path / "o", eval_n=0)
    with pytest.raises(TokenMDPError, match="unknown option"):
        compare(["grpo"], 1, model=str(tmp_path), out=tmp_path / "o", bogus=1)


def _html_rows(path: Path) -> dict[str, list[str]]:
    from html.parser import HTMLParser

    rows: list[list[str]] = []

    class P(HTMLParser):
        cell = None

        def handle_starttag(self, tag, attrs):
            if tag == "tr":
                rows.append([])
            elif tag in ("td", "th"):
                self.cell = ""

        def handle_endtag(self, tag):
            if tag in ("td", "th"):
                rows[-1].append(self.cell)
                self.cell = None

        def handle_data(self, data):
            if self.cell is not None:
                self.cell += data

    P().feed(path.read_text())
    return {r[0]: r for r in rows if r}


def test_compare_end_to_end(tiny_random_dir, tmp_path, capsys):
    """2 algorithms x 1 seed x 3 steps on a locally built tiny model: every file, the same prompt stream for both
    algorithms (asserted here again from the logged samples), and report tables that hold summary.csv's numbers."""
    from tokenmdp.cli import main
    from tokenmdp.experiments.report import SUMMARY_METRICS, format_cell
    from tokenmdp.tasks import get_task
    from tokenmdp.train.data import prompt_stream

    out = tmp_path / "cmp"
    args = ["compare", "--algos", "grpo,isft+", "--seeds", "1", "--steps", "3", "--model", str(tiny_random_dir),
            "--task", "countdown", "-o", "num_count=3", "-o", "high=20", "--template", "compact",
            "--max-new-tokens", "12", "--eval-n", "4", "--k", "2", "--prompts-per-step", "2", "--group-size", "2",
            "--report-to", "tensorboard", "--threads", "1", "--out", str(out), "--json"]
    assert main(args + ["--workers", "2"]) == 0  # two worker processes
    doc = json.loads(capsys.readouterr().out)
    for name in ("compare.json", "heldout.jsonl", "base_eval.json", "base_eval_records.jsonl", "summary.csv",
                 "summary.md", "report.html", "plots/final_accuracy.png", "plots/reward.png", "plots/length.png",
                 "plots/entropy.png", "plots/equivalence.png", "configs/grpo.yaml"):
        assert (out / name).is_file(), name
    for algo in ("grpo", "isft+"):
        run = out / "runs" / algo / "seed-0"
        for name in ("config.yaml", "metrics.jsonl", "samples.parquet", "DONE", "eval.json", "eval_records.jsonl",
                     "final/config.json"):
            assert (run / name).exists(), (algo, name)
        assert len((run / "metrics.jsonl").read_text().splitlines()) == 3
    # the same prompt stream for both algorithms, and it is the seed's stream (asserted from the logged samples)
    info = json.loads((out / "compare.json").read_text())
    assert info["fairness"]["seed-0"]["identical"] and info["fairness"]["seed-0"]["steps"] == 3
    task = get_task("countdown", num_count=3, high=20, template="compact")
    expected = [sorted({task.render(p) for p in step}) for step in prompt_stream(task, seed=0, steps=3,
                                                                                   prompts_per_step=2)]
    for algo in ("grpo", "isft+"):
        t = pq.read_table(out / "runs" / algo / "seed-0" / "samples.parquet").to_pydict()
        logged = [sorted({p for p, s in zip(t["prompt"], t["step"]) if s == step}) for step in (1, 2, 3)]
        assert logged == expected
        assert len(t["prompt"]) == 3 * 2 * 2  # the same number of sampled responses per algorithm
    # the held-out set is never trained on
    held = {json.loads(line)["id"] for line in (out / "heldout.jsonl").read_text().splitlines()}
    assert len(held) == 4
    assert not held & {p.id for step in prompt_stream(task, seed=0, steps=3, prompts_per_step=2) for p in step}
    # summary.csv <- eval.json, and the report's tables hold summary.csv's numbers
    with (out / "summary.csv").open() as fh:
        rows = {r["algo"]: r for r in csv.DictReader(fh)}
    assert list(rows) == ["base", "grpo", "isft+"]
    ev = json.loads((out / "runs" / "grpo" / "seed-0" / "eval.json").read_text())
    assert ev["algo"] == "grpo" and ev["settings"]["n"] == 4 and ev["settings"]["k"] == 2
    assert float(rows["grpo"]["greedy/pass@1_mean"]) == pytest.approx(ev["metrics"]["greedy/pass@1"])
    html_rows = _html_rows(out / "report.html")
    md = (out / "summary.md").read_text()
    for algo, row in rows.items():
        for j, (key, _, kind) in enumerate(SUMMARY_METRICS):
            mean = float(row[f"{key}_mean"]) if row[f"{key}_mean"] else float("nan")
            cell = format_cell({f"{key}_mean": mean, f"{key}_half_width": float("nan")}, key, kind)
            assert html_rows[algo][2 + j] == cell, (algo, key)
        assert f"| {algo} | 1 | " in md
    assert {r["algo"] for r in doc["summary"]} == {"base", "grpo", "isft+"}
    # run again in the same folder: finished runs and evaluations are reused; a changed config is refused
    before = (out / "runs" / "grpo" / "seed-0" / "eval.json").read_text()
    first = json.loads((out / "compare.json").read_text())["timings"]
    assert main(args) == 0
    capsys.readouterr()
    again = json.loads((out / "compare.json").read_text())["timings"]
    for label in ("grpo/seed-0", "isft+/seed-0"):  # reused, with the times they were trained in
        assert again[label]["reused"] and again[label]["train_s"] == first[label]["train_s"] > 0
        assert again[label]["train_cpu_s"] == first[label]["train_cpu_s"]
    assert (out / "runs" / "grpo" / "seed-0" / "eval.json").read_text() == before
    assert main([a if a != "3" else "4" for a in args]) == 2  # --steps 4
    assert "run.steps" in capsys.readouterr().err
    # --report-to tensorboard: accelerate's tracker wrote event files in every run folder
    for algo in ("grpo", "isft+"):
        assert list((out / "runs" / algo / "seed-0").rglob("events.out.tfevents*")), algo


def test_tracker_writes_plain_lines_where_bars_do_not_show():
    """Without a terminal (a log file, `make demo | tee`) every job start and end is one line with the share
    done; the share follows the weighted units of the overall bar."""
    from tokenmdp.experiments.compare.jobs import Tracker, _minutes

    lines: list[str] = []
    with Tracker(total=8, enabled=False, log=lines.append) as tracker:
        tracker("start", "grpo/seed-0", "train", 4)
        tracker("advance", "grpo/seed-0", 4, 1.0)
        tracker.done("grpo/seed-0")
        tracker("skip", "base", 2)
    assert len(lines) == 4
    assert lines[0].endswith("  0% done: train grpo/seed-0")
    assert lines[1].endswith(" 50% done, about 0m00s left: compare running: grpo/seed-0")  # crossed 10%..50%
    assert lines[2].endswith(" 50% done, about 0m00s left: finished grpo/seed-0")
    assert lines[3].endswith(" 75% done, about 0m00s left: reused base")  # 4 units computed, 2 reused, 2 to do

    lines.clear()
    with Tracker(total=10, enabled=False, log=lines.append) as tracker:
        tracker("skip", "base", 9)  # nothing computed yet: no estimate of the time left
    assert lines == [lines[0]] and lines[0].endswith(" 90% done: reused base")
    assert _minutes(75) == "1m15s" and _minutes(3600) == "60m00s"


def test_tracker_counts_a_retried_job_once():
    """A job started again (its Ray worker died) takes back the units it had advanced: the overall share counts
    each job once. A job's second phase (eval after train) is not a retry."""
    from tokenmdp.experiments.compare.jobs import Tracker

    with Tracker(total=20, enabled=False, log=lambda line: None) as tracker:
        tracker("start", "grpo/seed-0", "train", 4)
        tracker("advance", "grpo/seed-0", 3, 2.0)
        tracker("start", "isft+/seed-0", "train", 4)
        tracker("advance", "isft+/seed-0", 1, 2.0)
        assert tracker.completed == 8.0
        tracker("start", "grpo/seed-0", "train", 4)  # the retry
        assert tracker.completed == 2.0
        tracker("advance", "grpo/seed-0", 4, 2.0)
        tracker("start", "grpo/seed-0", "eval", 2)  # the next phase of the same attempt
        tracker("advance", "grpo/seed-0", 2, 1.0)
        assert tracker.completed == 12.0


def test_presets_fill_settings_and_options_override_them():
    from tokenmdp.experiments.compare import make_settings
    from tokenmdp.experiments.compare.settings import COMPARE_PRESETS

    s = make_settings("paper-small", seeds=2, steps=5, overrides=["algo.kl_coef=0"])
    assert s.algos == COMPARE_PRESETS["paper-small"]["algos"] and s.seeds == [0, 1] and s.steps == 5
    assert s.prompts_per_step == 32 and s.lr == 2e-4
    assert s.overrides == ["optim.warmup_steps=10", "algo.kl_coef=0"]  # --set adds to the preset's overrides
    demo = make_settings("demo")
    assert {"grpo_nokl", "isft+-adv", "isft-"} <= set(demo.algos) and demo.seeds == [0, 1, 2, 3]
    assert make_settings(None).algos == list(make_settings(None, algos=None).algos)
    with pytest.raises(TokenMDPError, match="unknown preset 'paper-big'; choose from demo, paper-small, "
                                            "c3c4-long, c3-lr-sweep, real-small, env-calculator, env-two-llm, "
                                            "process-credit"):
        make_settings("paper-big")


@pytest.mark.parametrize("arms, match", [
    ({"calc": {"algo": "nope"}}, "arm 'calc': unknown algorithm 'nope'"),
    ({"grpo": {"algo": "grpo"}}, "name of an algorithm preset"),
    ({"calc": {"algo": "grpo", "set": "task.env.kind=calculator"}}, "'set' must be a list"),
    ({"calc": {"algo": "grpo", "steps": 0}}, "'steps' must be an integer >= 1"),
    ({"calc": {"algo": "grpo", "colour": "red"}}, "unknown key"),
    ({"a/b": {"algo": "grpo"}}, "plain folder name"),
    ({"calc": "grpo"}, "must be a mapping"),
    ({"calc": {"algo": "grpo", "set": ["run.steps=5"]}}, "its 'steps' key"),
    ({"calc": {"algo": "grpo", "set": ["run.seed=1"]}}, "cannot hold 'run.seed=1'"),
    ({1: {"algo": "grpo"}}, "must be text"),
    ({"isftp": {"algo": "grpo"}}, "isft\\+ and isftp would share the config file configs/isftp.yaml"),
])
def test_bad_arms_are_one_error_naming_the_arm(arms, match):
    from tokenmdp.experiments.compare import make_settings

    with pytest.raises(TokenMDPError, match=match):
        make_settings(None, algos=["isft+", *[a for a in arms if isinstance(a, str)]], arms=arms)


def test_inline_arms_longer_than_a_file_name_are_read():
    from tokenmdp.commands.compare import parse_arms

    text = "{calc: {algo: grpo_nokl, set: [" + ", ".join(["task.env.kind=calculator"] * 12) + "]}}"
    assert len(text) > 255 and parse_arms(text)["calc"]["algo"] == "grpo_nokl"
    with pytest.raises(TokenMDPError, match="--arms: expected a mapping"):
        parse_arms("[1, 2]")


def test_the_beyond_presets_name_their_arms():
    from tokenmdp.experiments.compare import make_settings
    from tokenmdp.experiments.compare.settings import arm_of

    for preset in ("env-calculator", "env-two-llm", "process-credit"):
        s = make_settings(preset)
        assert s.algos[0] == "grpo_nokl" and arm_of(s, "grpo_nokl").overrides == ()
        assert [a for a in s.algos if a not in s.arms] in (["grpo_nokl"], ["grpo_nokl", "ppo"])
        for name in s.arms:
            assert name in s.algos and arm_of(s, name).steps == s.steps
    s = make_settings("process-credit")
    assert "algo.overrides.returns=to_go" in arm_of(s, "process-dr_grpo_togo").overrides
    with pytest.raises(TokenMDPError, match="--algos: unknown algorithm 'x'"):
        make_settings("env-two-llm", algos=["grpo_nokl", "x"])


def test_compare_with_arms_end_to_end(tiny_random_dir, tmp_path, capsys):
    """An arm with the calculator environment and an arm of fewer steps beside a plain algorithm: each run gets its
    arm's config, the calculator arm is evaluated through its environment (and from step 0), fairness is checked
    per run length, and the report shows the section beyond the degenerate MDP after the verdicts."""
    from tokenmdp.cli import main

    out = tmp_path / "arms"
    from test_trainer import ParityTask  # tests/ is on the path: conftest.py

    from tokenmdp.tasks.task import Problem
    from tokenmdp.tasks.registry import register_task

    class ParityForCompare(ParityTask):  # parity with an answer field: compare writes its held-out problems
        def problems(self, split="train", n=None, seed=0):
            return [Problem(p.id, p.question, "even", p.metadata) for p in super().problems(split, n, seed)]

    register_task("parity_compare", ParityForCompare)

    # parity, which a random model passes about half of the time: groups are mixed, so the calculator arm's steps
    # have a gradient and its logged cosine says something (on Countdown a random model scores 0: no gradient)
    arms = ('{calc: {algo: grpo_nokl, set: ["task.env.kind=calculator", "task.env.max_turns=3", '
            '"task.env.turn_tokens=6", "run.equivalence=true"]}, short: {algo: isft+, steps: 2}}')
    args = ["compare", "--algos", "grpo_nokl,calc,short", "--arms", arms, "--seeds", "1", "--steps", "3", "--model",
            str(tiny_random_dir), "--task", "parity_compare", "--template", "plain", "--max-new-tokens", "12",
            "--eval-n",
            "4", "--k", "2", "--prompts-per-step", "2", "--group-size", "2", "--eval-every", "3", "--threads", "1",
            "--workers", "1", "--out", str(out)]
    assert main(args) == 0
    capsys.readouterr()
    calc = out / "runs" / "calc" / "seed-0"
    cfg = yaml.safe_load((calc / "config.yaml").read_text())
    assert cfg["task"]["env"]["kind"] == "calculator" and cfg["run"]["eval_before"] is True
    ev = json.loads((calc / "eval.json").read_text())
    assert ev["settings"]["env"] == "calculator" and ev["key"]["env"]["kind"] == "calculator"
    steps = [json.loads(line)["step"] for line in (calc / "metrics.jsonl").read_text().splitlines()]
    assert steps[0] == 0 and max(steps) == 3
    short = [json.loads(line)["step"] for line in (out / "runs" / "short" / "seed-0" / "metrics.jsonl")
             .read_text().splitlines()]
    assert max(short) == 2
    fair = json.loads((out / "compare.json").read_text())["fairness"]
    assert fair["seed-0/2-steps"]["algos"] == ["short"] and fair["seed-0/3-steps"]["algos"] == ["grpo_nokl", "calc"]
    beyond = json.loads((out / "beyond.json").read_text())
    assert beyond["reference"] == "grpo_nokl" and set(beyond["arms"]) == {"grpo_nokl", "calc", "short"}
    assert beyond["arms"]["calc"]["kind"]["env"] == "calculator"
    cos = beyond["arms"]["calc"].get("cosine")  # only steps with a gradient count (a random model may have none)
    assert cos is None or cos["min"] > 0.999  # on-policy GRPO = weighted SFT through the calculator
    # parity gives the calculator arm mixed groups: its steps have a gradient, so the cosine is there, over the
    # steps the run logged with a non-zero gradient, and it is the one logged
    calc_steps = [json.loads(line) for line in (calc / "metrics.jsonl").read_text().splitlines()]
    live = [r["equiv/cosine_on_policy"] for r in calc_steps if r.get("equiv/grad_norm_grpo", 0) > 0]
    assert cos is not None and cos["steps"] == len(live) >= 1, beyond["arms"]["calc"]
    assert cos["min"] == pytest.approx(min(live)) and cos["min"] > 0.999 and cos["holds"] is True
    md = (out / "summary.md").read_text()
    assert md.index("## The paper's claims") < md.index("## Beyond the degenerate MDP")
    page = (out / "report.html").read_text()  # the verdict table right under its heading, the section after it
    assert page.index("<h2>The paper's claims</h2>") < page.index("<table") < \
        page.index("<h2>Beyond the degenerate MDP</h2>")
    assert main(args[:4] + ["{calc: [1, 2]}"] + args[5:]) == 2
    assert "--arms" in capsys.readouterr().err


def test_every_preset_is_in_the_help_text():
    """`compare --help` reads the preset table: every preset has its line, and no line names a preset that is gone."""
    from tokenmdp.experiments.compare.settings import COMPARE_PRESETS, PRESET_HELP, presets_help

    assert set(PRESET_HELP) == set(COMPARE_PRESETS)
    text = presets_help()
    assert all(f"{name} ({PRESET_HELP[name]})" in text for name in COMPARE_PRESETS)


def test_compare_with_chat_and_lora_evaluates_the_merged_adapter(tiny_random_dir, tmp_path):
    """--chat: the runs train on chat-rendered prompts (the fairness check renders them alike), the held-out
    evaluation renders them too (its key says so), and a LoRA run's final/ (an adapter) is evaluated merged onto
    its base; its score equals the merged model's own evaluation."""
    import shutil

    from transformers import AutoTokenizer

    from tokenmdp.experiments.compare import compare
    from tokenmdp.policy.adapters import merge_adapter
    from tokenmdp.policy.model import load_policy
    from tokenmdp.train.heldout import evaluate

    model_dir = tmp_path / "chat_model"
    shutil.copytree(tiny_random_dir, model_dir)
    tok = AutoTokenizer.from_pretrained(model_dir)
    tok.chat_template = "{% for m in messages %}U:{{ m['content'] }}|{% endfor %}{% if add_generation_prompt %}A:" \
                        "{% endif %}"
    tok.save_pretrained(model_dir)
    out = compare(["grpo_nokl"], 1, model=str(model_dir), task="countdown", out=tmp_path / "cmp", eval_n=3, k=2,
                  steps=2, prompts_per_step=2, group_size=2, max_new_tokens=6, eval_every=0, threads=1, workers=1,
                  chat=True, template="compact", overrides=["model.lora.rank=4", "model.lora.alpha=8"])
    run = out / "runs" / "grpo_nokl" / "seed-0"
    import pyarrow.parquet as pq

    prompts = pq.read_table(run / "samples.parquet", columns=["prompt"]).to_pydict()["prompt"]
    assert prompts and all(p.startswith("U:") and p.endswith("|A:") for p in prompts)
    assert (run / "final" / "adapter_config.json").is_file() and not (run / "final" / "config.json").exists()
    ev = json.loads((run / "eval.json").read_text())
    assert ev["key"]["chat"] is True
    base = json.loads((out / "base_eval.json").read_text())
    assert base["key"]["chat"] is True
    merged = merge_adapter(run / "final", tmp_path / "merged")
    from tokenmdp.tasks import get_task

    task = get_task("countdown")
    problems = task.load_problems(out / "heldout.jsonl")
    again = evaluate(load_policy(merged), None, task, problems, k=2, temperature=1.0, max_new_tokens=6, seed=0,
                     template="compact", chat=True, batch_size=512)
    saved = [json.loads(x) for x in (run / "eval_records.jsonl").read_text().splitlines()]
    def texts(records):
        return [(r["greedy"]["completion"], [x["completion"] for x in r["samples"]]) for r in records]

    assert texts(again["records"]) == texts(saved) and len(saved) == 3
    assert again["metrics"]["sampled/length"] == ev["metrics"]["sampled/length"]


def test_a_worker_ends_when_its_comparison_is_killed(tmp_path):
    """A comparison killed by a signal must not leave its workers training on (they wrote into the run folders of
    the comparison restarted in their place): the worker's watchdog ends it once its parent is gone."""
    import os
    import signal
    import subprocess
    import sys
    import time

    script = tmp_path / "parent.py"
    script.write_text(
        "import multiprocessing, sys, time\n"
        "from tokenmdp.experiments.compare.jobs import exit_with_parent\n"
        "def child(parent):\n"
        "    exit_with_parent(parent, poll_s=0.2)\n"
        "    time.sleep(60)\n"
        "if __name__ == '__main__':\n"
        "    import os\n"
        "    p = multiprocessing.get_context('spawn').Process(target=child, args=(os.getpid(),))\n"
        "    p.start()\n"
        "    print(p.pid, flush=True)\n"
        "    time.sleep(60)\n")
    parent = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, text=True,
                              env=os.environ | {"PYTHONPATH": os.pathsep.join(sys.path)})
    child = int(parent.stdout.readline())
    time.sleep(1.0)  # the child is up, its watchdog started
    os.kill(parent.pid, signal.SIGKILL)
    parent.wait()
    for _ in range(100):
        try:
            os.kill(child, 0)
        except ProcessLookupError:
            break
        time.sleep(0.1)
    else:
        os.kill(child, signal.SIGKILL)
        raise AssertionError("the worker outlived its comparison by 10 s")

