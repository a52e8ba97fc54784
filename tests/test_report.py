"""The report from run folders: summary.csv against hand-computed CIs, the tables hold the CSV's numbers, the HTML is
self-contained, folders merge, and the length reading follows the numbers. Fake run folders follow the layout of
docs/interfaces.md (config.yaml, metrics.jsonl, DONE) plus the comparison's eval.json / base_eval.json."""

from __future__ import annotations

import csv
import json
import math
import re
from html.parser import HTMLParser
from pathlib import Path

import pytest
import yaml

from tokenmdp.cli import main
from tokenmdp.errors import TokenMDPError
from tokenmdp.experiments.report.plots import seed_band
from tokenmdp.experiments.report import SUMMARY_METRICS, build_report, format_cell
from tokenmdp.experiments.runs import collect, read_metrics

T975_2 = 4.302652729911275  # Student t, 97.5% quantile, 2 degrees of freedom


def eval_doc(greedy, sampled, passk, inc_len, cor_len=20.0, k=4, algo=None, seed=None):
    metrics = {"greedy/pass@1": greedy, "sampled/pass@1": sampled, "pass@k": passk, "majority@k": sampled,
               "best_of_k": passk, "sampled/format_rate": 0.9, "sampled/length_correct": cor_len,
               "sampled/length_incorrect": inc_len, "n_problems": 10}
    doc = {"metrics": metrics, "settings": {"k": k, "n": 10, "temperature": 1.0}, "time_s": 1.5}
    if algo is not None:
        doc.update(algo=algo, seed=seed)
    return doc


def write_run(root: Path, algo: str, seed: int, *, steps=5, reward0=0.2, inc_growth=1.0, ev=None, cosine=False):
    path = root / "runs" / algo / f"seed-{seed}"
    path.mkdir(parents=True)
    (path / "config.yaml").write_text(yaml.safe_dump({"algo": {"name": algo}, "run": {"seed": seed, "steps": steps}}))
    lines = []
    for step in range(1, steps + 1):
        row = {"step": step, "reward/mean": reward0 + 0.1 * step, "length/correct": 20.0,
               "length/incorrect": 30.0 + inc_growth * step, "policy/approx_kl": 0.01 * step,
               "policy/entropy": 1.0 - 0.05 * step, "time/rollout": 0.5, "time/update": 0.25}
        if cosine:
            row["equiv/cosine"] = 0.99
        lines.append(json.dumps(row))
    (path / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    (path / "DONE").write_text("")
    if ev is not None:
        (path / "eval.json").write_text(json.dumps(ev))
    return path


@pytest.fixture()
def compare_dir(tmp_path):
    root = tmp_path / "cmp"
    greedy = {"grpo": [0.2, 0.4, 0.6], "dr_grpo": [0.5, 0.5, 0.8]}
    inc = {"grpo": [60.0, 62.0, 64.0], "dr_grpo": [30.0, 31.0, 32.0]}
    for algo in ("grpo", "dr_grpo"):
        for seed in range(3):
            write_run(root, algo, seed, cosine=algo == "grpo", inc_growth=3.0 if algo == "grpo" else 0.0,
                      ev=eval_doc(greedy[algo][seed], 0.3, 0.7, inc[algo][seed]))
    (root / "base_eval.json").write_text(json.dumps(eval_doc(0.1, 0.15, 0.5, 40.0)))
    (root / "compare.json").write_text(json.dumps({
        "settings": {"algos": ["grpo", "dr_grpo"], "seeds": 3, "steps": 5},
        "timings": {"pretrain_s": 0.0, "total_s": 12.0}, "created": "2025-01-01", "machine": "test"}))
    return root


def read_csv(path: Path) -> dict[str, dict]:
    with path.open() as fh:
        return {row["algo"]: row for row in csv.DictReader(fh)}


class _Tables(HTMLParser):
    def __init__(self):
        super().__init__()
        self.rows, self.imgs, self._row, self._cell = [], [], None, None

    def handle_starttag(self, tag, attrs):
        if tag == "tr":
            self._row = []
        elif tag in ("td", "th"):
            self._cell = ""
        elif tag == "img":
            self.imgs.append(dict(attrs).get("src", ""))

    def handle_endtag(self, tag):
        if tag in ("td", "th") and self._row is not None:
            self._row.append(self._cell)
            self._cell = None
        elif tag == "tr":
            self.rows.append(self._row)
            self._row = None

    def handle_data(self, data):
        if self._cell is not None:
            self._cell += data


def test_report_files_and_hand_computed_ci(compare_dir):
    out = build_report(compare_dir)
    assert out == compare_dir
    for name in ("summary.csv", "summary.md", "report.html", "plots/final_accuracy.png", "plots/reward.png",
                 "plots/length.png", "plots/kl.png", "plots/entropy.png", "plots/equivalence.png"):
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name
    rows = read_csv(out / "summary.csv")
    assert list(rows) == ["base", "grpo", "dr_grpo"]
    g = rows["grpo"]
    half = T975_2 * 0.2 / math.sqrt(3)  # greedy [0.2, 0.4, 0.6]: s = 0.2
    assert float(g["greedy/pass@1_mean"]) == pytest.approx(0.4)
    assert float(g["greedy/pass@1_half_width"]) == pytest.approx(half, rel=1e-8)
    assert float(g["greedy/pass@1_low"]) == pytest.approx(0.4 - half, rel=1e-8)
    assert g["runs"] == "3" and g["seeds"] == "0 1 2"
    # dr_grpo greedy [0.5, 0.5, 0.8]: mean 0.6, s = sqrt(0.06/2) = 0.173205
    d = rows["dr_grpo"]
    assert float(d["greedy/pass@1_mean"]) == pytest.approx(0.6)
    assert float(d["greedy/pass@1_half_width"]) == pytest.approx(T975_2 * math.sqrt(0.03) / math.sqrt(3), rel=1e-8)
    # final training reward: last fifth of 5 steps = step 5: 0.2 + 0.5
    assert float(g["train/final_reward_mean"]) == pytest.approx(0.7)
    # the base model: one evaluation, no interval
    assert float(rows["base"]["greedy/pass@1_mean"]) == pytest.approx(0.1)
    assert rows["base"]["greedy/pass@1_half_width"] == ""


def test_tables_hold_the_csv_numbers(compare_dir):
    out = build_report(compare_dir)
    rows = read_csv(out / "summary.csv")
    parser = _Tables()
    parser.feed((out / "report.html").read_text())
    html_rows = {r[0]: r for r in parser.rows if r and r[0] in rows}
    md_rows = {cells[0]: cells for cells in (
        [c.strip() for c in line.strip("|").split("|")] for line in (out / "summary.md").read_text().splitlines()
        if line.startswith("| ")) if cells[0] in rows}
    assert set(html_rows) == set(md_rows) == set(rows)
    for algo, row in rows.items():
        for j, (key, _, kind) in enumerate(SUMMARY_METRICS):
            mean = float(row[f"{key}_mean"]) if row[f"{key}_mean"] else math.nan
            half = float(row[f"{key}_half_width"]) if row[f"{key}_half_width"] else math.nan
            expected = format_cell({f"{key}_mean": mean, f"{key}_half_width": half}, key, kind)
            assert html_rows[algo][2 + j] == expected == md_rows[algo][2 + j], (algo, key)
    assert html_rows["grpo"][2] == "40.0 ± 49.7"  # 0.4 ± 0.4968 as percent
    assert html_rows["base"][2] == "10.0"
    # every figure is inline; nothing is fetched from elsewhere
    assert len(parser.imgs) >= 6 and all(src.startswith("data:image/png;base64,") for src in parser.imgs)
    assert "http://" not in (out / "report.html").read_text() and "https://" not in (out / "report.html").read_text()


def test_length_reading_follows_the_numbers(compare_dir, tmp_path):
    md = build_report(compare_dir).joinpath("summary.md").read_text()
    # grpo incorrect held-out lengths [60, 62, 64] vs dr_grpo [30, 31, 32]: 31 tokens longer, intervals apart
    assert "Wrong answers under grpo are 31.0 tokens longer than under dr_grpo" in md
    assert "do not overlap" in md
    # training samples: grpo 30 + 3*step, first fifth step 1 = 33, last fifth step 5 = 45
    assert "went from 33.0 to 45.0 tokens" in md
    one = tmp_path / "one"
    write_run(one, "grpo", 0, ev=eval_doc(0.2, 0.2, 0.5, 50.0))
    write_run(one, "isft+", 0, ev=eval_doc(0.2, 0.2, 0.5, 40.0))
    md1 = build_report(one).joinpath("summary.md").read_text()
    assert "10.0 tokens longer than under isft+" in md1 and "one seed there is no interval" in md1


def test_merge_folders_from_two_machines(tmp_path):
    a, b = tmp_path / "day1", tmp_path / "day2"
    write_run(a, "grpo", 0, ev=eval_doc(0.2, 0.2, 0.5, 50.0, algo="grpo", seed=0))
    write_run(b, "grpo", 1, ev=eval_doc(0.4, 0.2, 0.5, 50.0, algo="grpo", seed=1))
    write_run(b, "rloo", 1, ev=eval_doc(0.3, 0.2, 0.5, 50.0))
    with pytest.raises(TokenMDPError, match="--out"):
        build_report([a, b])
    out = build_report([a, b / "runs" / "grpo" / "seed-1", b / "runs" / "rloo", a], tmp_path / "merged")
    rows = read_csv(out / "summary.csv")
    assert rows["grpo"]["runs"] == "2"  # the duplicate folder a is read once
    assert float(rows["grpo"]["greedy/pass@1_mean"]) == pytest.approx(0.3)
    half = 12.706204736 * math.sqrt(0.02) / math.sqrt(2)  # [0.2, 0.4]: s = sqrt(0.02)
    assert float(rows["grpo"]["greedy/pass@1_half_width"]) == pytest.approx(half)
    assert rows["rloo"]["runs"] == "1" and "base" not in rows


def test_unfinished_runs_are_left_out(compare_dir):
    """A run that stopped early (no DONE, no eval.json) is named in summary.md but counted nowhere."""
    crashed = write_run(compare_dir, "grpo", 3, reward0=5.0)
    (crashed / "DONE").unlink()
    col = collect([compare_dir])
    assert [r.label for r in col.unfinished] == ["grpo/seed-3"]
    out = build_report(compare_dir)
    rows = read_csv(out / "summary.csv")
    assert rows["grpo"]["runs"] == "3" and rows["grpo"]["seeds"] == "0 1 2"
    # train/final_reward: last fifth (1 step) of reward0 + 0.1 * step with reward0 0.2, 5 steps -> 0.7
    assert float(rows["grpo"]["train/final_reward_mean"]) == pytest.approx(0.7)
    assert "Left out (not finished: no DONE, no held-out evaluation): grpo/seed-3." in (out / "summary.md").read_text()
    assert "left out, not finished: grpo/seed-3" in (out / "report.html").read_text()
    lone = write_run(compare_dir, "rloo", 0)  # an algorithm whose only run is unfinished: no row at all
    (lone / "DONE").unlink()
    assert "rloo" not in read_csv(build_report(compare_dir) / "summary.csv")


def test_seed_band_and_metrics_reader(tmp_path):
    import pandas as pd

    f1 = pd.DataFrame({"reward/mean": [0.0, 1.0]}, index=[1, 2])
    f2 = pd.DataFrame({"reward/mean": [1.0, 1.0, 0.5]}, index=[1, 2, 3])
    band = seed_band([f1, f2], "reward/mean")
    assert band["mean"].tolist() == [0.5, 1.0, 0.5]
    assert band["low"].tolist() == [0.0, 1.0, 0.5] and band["high"].tolist() == [1.0, 1.0, 0.5]
    assert band["n"].tolist() == [2, 2, 1]
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1, "a": 1}\n{"step": 1, "eval/accuracy": 0.5}\n\n{"a": 3}\n')
    m = read_metrics(path)
    assert m.index.tolist() == [1, 4] and m.loc[1, "eval/accuracy"] == 0.5  # lines of one step merge
    path.write_text('{"step": 1}\nnot json\n')
    with pytest.raises(TokenMDPError, match=r"metrics.jsonl line 2"):
        read_metrics(path)


def test_errors_name_the_folder(tmp_path):
    with pytest.raises(TokenMDPError, match="not found"):
        collect([tmp_path / "nope"])
    (tmp_path / "empty").mkdir()
    with pytest.raises(TokenMDPError, match="no run folder"):
        collect([tmp_path / "empty"])


def test_report_cli(compare_dir, tmp_path, capsys):
    assert main(["report", str(compare_dir), "--out", str(tmp_path / "r"), "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["report"].endswith("report.html") and (tmp_path / "r" / "report.html").is_file()
    by_algo = {r["algo"]: r for r in doc["summary"]}
    assert by_algo["grpo"]["greedy/pass@1_mean"] == pytest.approx(0.4)
    assert by_algo["base"]["greedy/pass@1_half_width"] is None
    assert main(["report", str(tmp_path / "missing")]) == 2
    assert "error: run folder not found" in capsys.readouterr().err
    assert main(["report", str(compare_dir)]) == 0
    assert re.search(r"\| grpo \| 3 \| 40\.0 ± 49\.7", capsys.readouterr().out)


def test_report_leads_with_the_claims_and_requires_them_on_demand(compare_dir, tmp_path, capsys):
    """claims.json and the first section of summary.md / report.html are the verdicts; `--claims` makes a claim
    that these runs cannot compute one error naming the runs it lacks."""
    out = build_report(compare_dir, tmp_path / "r")
    claims = json.loads((out / "claims.json").read_text())
    assert list(claims) == ["C1", "C2", "C3", "C4", "C5"]
    assert claims["C3"]["verdict"] == "not measured" and "isft- (seeds 0-2)" in claims["C3"]["missing"]
    md = (out / "summary.md").read_text()
    assert md.index("## The paper's claims") < md.index("## Held-out results")
    page = (out / "report.html").read_text()
    assert page.index("The paper's claims") < page.index("Held-out results") and 'id="claim-C1"' in page
    assert main(["report", str(compare_dir), "--out", str(tmp_path / "r2"), "--claims", "C3"]) == 2
    err = capsys.readouterr().err
    assert "C3 needs isft- (seeds 0-2)" in err and not (tmp_path / "r2").exists()  # nothing half-written
    assert main(["report", str(compare_dir), "--out", str(tmp_path / "r3"), "--claims", "C9"]) == 2
    assert "unknown claim(s) C9" in capsys.readouterr().err


def test_held_out_curves_start_at_the_base_model(compare_dir):
    """Step 0 of every run's held-out curve is the base model on the trainer's curve problems (the first curve_n
    held-out problems), read from the base evaluation's per-problem records."""
    from tokenmdp.experiments.runs import base_curve_point

    records = [{"greedy": {"correct": c}, "pass@1": p} for c, p in [(True, 0.5), (False, 0.25), (True, 1.0),
                                                                     (True, 0.0)]]
    (compare_dir / "base_eval_records.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    info = json.loads((compare_dir / "compare.json").read_text())
    info["settings"]["curve_n"] = 3
    (compare_dir / "compare.json").write_text(json.dumps(info))
    point = base_curve_point(compare_dir, info)
    assert point == {"step": 0, "eval/greedy_accuracy": pytest.approx(2 / 3), "eval/accuracy": pytest.approx(2 / 3),
                     "eval/sampled_accuracy": pytest.approx(1.75 / 3)}  # (0.5 + 0.25 + 1) / 3
    col = collect([compare_dir])
    for run in col.runs:
        assert run.metrics.index[0] == 0 and run.metrics.loc[0, "eval/accuracy"] == pytest.approx(2 / 3)
        assert list(run.metrics.index) == list(range(0, 6))


def test_the_simulated_tier_has_its_section_after_the_claims(compare_dir, tmp_path):
    """A sweep saved in the comparison's sim/ (as the main job does) gets its section, reading and figures; the
    verdicts stay first."""
    from tokenmdp.experiments.simulated import run_sweep, save_sweep
    from tokenmdp.experiments.simulated.plots import sim_figures

    doc = run_sweep(presets=["isft-"], lrs=[1.0], group_sizes=[4], seeds=20, steps=30, optimizer="adam", tied=True,
                    start_seed=4, seed=0)
    save_sweep(doc, compare_dir / "sim", sim_figures(doc))
    out = build_report(compare_dir, tmp_path / "r")
    md = (out / "summary.md").read_text()
    assert md.index("## The paper's claims") < md.index("## The simulated tier") < md.index("## Held-out results")
    run = doc["runs"][0]
    rate = f"{run['collapse_rate']:.1%}" if run["collapse_rate"] else "0%"
    assert f"**isft-** (G = 4): seeds that collapse: {rate}" in md and "### G = 4" in md
    page = (out / "report.html").read_text()
    assert page.index("<h2>The simulated tier</h2>") > page.index('id="claim-C5"')
    assert "alt='sim_collapse'" in page and "E[len | incorrect]" in page
