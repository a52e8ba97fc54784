"""Comparison settings beyond the basics: the presets' arms that set their own rate, and the extra held-out
evaluations of every final model (``--extra-evals``) with the claims judged again under each."""

from __future__ import annotations

import json

from tokenmdp.cli import main
from tokenmdp.experiments.compare import arm_of, arm_overrides, make_settings
from tokenmdp.train.config import load_config


def test_lr_sweep_arms_set_their_own_rate():
    """c3-lr-sweep: each ISFT- arm's optim.lr comes after the comparison's 2e-4 and wins; it logs the KL to the
    base."""
    s = make_settings("c3-lr-sweep")
    rates = []
    for name in s.algos:
        arm = arm_of(s, name)
        cfg = load_config(None, [f"algo.name={arm.algo}", "optim.lr=2e-4", *arm_overrides(s, arm)])
        assert cfg.algo.name == "isft-" and cfg.run.kl_to_base
        rates.append(cfg.optim.lr)
    assert rates == [5e-4, 1e-3]


def test_extra_evaluations_beside_the_main_one(tiny_random_dir, tmp_path, capsys):
    """--extra-evals: each final and the base evaluated again (temperature 0.6; pass@8 on the first 3 problems,
    no greedy), beside an unchanged main evaluation, reused when run again; the report tables them with their
    own C3 verdict and plots pass@k."""
    out = tmp_path / "cmp"
    args = ["compare", "--algos", "grpo_nokl,isft-", "--seeds", "1", "--steps", "2", "--model", str(tiny_random_dir),
            "--task", "countdown", "-o", "num_count=3", "-o", "high=20", "--template", "compact",
            "--max-new-tokens", "12", "--eval-n", "4", "--k", "2", "--prompts-per-step", "2", "--group-size", "2",
            "--threads", "1", "--workers", "1", "--out", str(out), "--json"]
    assert main(args) == 0
    main_eval = (out / "runs" / "isft-" / "seed-0" / "eval.json").read_text()
    extra = "{t0.6: {temperature: 0.6}, pass8: {n: 3, k: 8, greedy: false}}"
    assert main(args + ["--extra-evals", extra]) == 0
    capsys.readouterr()
    run = out / "runs" / "isft-" / "seed-0"
    assert (run / "eval.json").read_text() == main_eval
    hot = json.loads((run / "eval-t0.6.json").read_text())
    assert hot["settings"]["temperature"] == 0.6 and hot["settings"]["n"] == 4 and hot["settings"]["k"] == 2
    wide = json.loads((out / "base_eval-pass8.json").read_text())
    assert wide["settings"]["n"] == 3 and wide["settings"]["k"] == 8 and "greedy/pass@1" not in wide["metrics"]
    assert {"pass@1", "pass@2", "pass@4", "pass@8"} <= set(wide["metrics"])
    assert (run / "eval_records-pass8.jsonl").is_file()
    variants = json.loads((out / "variants.json").read_text())
    assert set(variants) == {"pass8", "t0.6"} and variants["pass8"]["ks"] == [1, 2, 4, 8]
    assert variants["t0.6"]["algos"]["isft-"]["sampled/pass@1"]["mean"] == hot["metrics"]["sampled/pass@1"]
    assert variants["pass8"]["algos"]["base"]["pass@8"]["mean"] == wide["metrics"]["pass@8"]
    c3 = variants["t0.6"]["claims"]["C3"]
    assert c3["main"] == json.loads((out / "claims.json").read_text())["C3"]["verdict"]
    assert "## Evaluation variants" in (out / "summary.md").read_text()
    assert (out / "plots" / "passk.png").is_file() and "<h3>pass8: temperature 1.0" in (out / "report.html").read_text()
    first = (run / "eval-t0.6.json").read_text()
    assert main(args + ["--extra-evals", extra]) == 0  # reused
    assert (run / "eval-t0.6.json").read_text() == first
    capsys.readouterr()
    for bad, match in (("{x: {colour: red}}", "unknown key"), ("{x: {n: 9}}", "exceeds the held-out set"),
                       ("{'a/b': {}}", "a name is letters"), ("[1]", "expected a mapping")):
        assert main(args + ["--extra-evals", bad]) == 2
        assert match in capsys.readouterr().err
