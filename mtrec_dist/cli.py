"""``mtrec`` command line: thin wrappers that parse arguments and call the library.

Every subcommand that reads data takes ``--config FILE`` plus ``key.sub=value`` overrides, the
same way ``launch/train.py`` does, so a command line can be copied between them.

The subcommands that train, prepare or evaluate import their module inside the subcommand:
those pull torch, transformers and the models (seconds), which ``mtrec --help``, ``mtrec
synth`` and ``mtrec score`` never need.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from mtrec_dist.config import ConfigError, load_config
from mtrec_dist.data.synthetic import generate
from mtrec_dist.eval.submission import score_submission
from mtrec_dist.train.errors import TrainingFailed
from mtrec_dist.train.runlock import RunFolderBusy


def _add_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", help="YAML file in configs/ (defaults: mtrec_dist/config.py)")
    p.add_argument("overrides", nargs="*", help="key.sub=value overrides, e.g. trainer.lr=3e-5")


def cmd_synth(a: argparse.Namespace) -> int:
    info = generate(a.out, scale=a.scale, seed=a.seed)
    print(json.dumps({k: v for k, v in info.items() if k != "users"}, indent=2))
    print(f"wrote synthetic MIND ({a.scale}) to {a.out}/{{train,dev,test,truth}}")
    return 0


def cmd_prepare(a: argparse.Namespace) -> int:
    # lazy: pulls torch and pyarrow (seconds); `mtrec --help` must not
    from mtrec_dist.data.prepare import prepare

    cfg = load_config(a.config, a.overrides)
    manifest = prepare(cfg)
    print(
        f"prepared {cfg.prepared_dir}: {manifest['news']['count']} news rows, splits "
        + ", ".join(f"{s}={v['impressions']} impressions" for s, v in manifest["splits"].items())
    )
    return 0


def cmd_train(a: argparse.Namespace) -> int:
    cfg = load_config(a.config, a.overrides)  # a config mistake fails before the slow import
    # lazy: pulls torch, transformers and the models (seconds); `mtrec --help` must not
    from mtrec_dist.train.launch import run_training

    result = run_training(cfg, resume=a.resume, overrides=a.overrides)
    print(json.dumps(result, indent=2))
    return 0


def cmd_tune(a: argparse.Namespace) -> int:
    # lazy: pulls torch, transformers and the models (seconds); `mtrec --help` must not
    from mtrec_dist.train.tune import run_sweep

    res = run_sweep(a.config, a.space, a.overrides, out=a.out, retry_failed=a.retry_failed)
    print(f"wrote {res['out']}/results.csv and results.md ({len(res['rows'])} trials)")
    if res["best"] is None:
        print("no trial fit: no best_deepspeed.json written", file=sys.stderr)
        return 1
    b = res["best"]
    print(
        f"best: trial {b['trial']:03d}, {b['samples_per_s']:.1f} samples/s, "
        f"peak {b['peak_mb']:.0f} MiB/worker -> {b['deepspeed_path']}"
    )
    print(b["command"])
    return 0


def _runs(a: argparse.Namespace) -> str | list[str]:
    """One ``--run``: that folder (exactly as before); several: the ensemble's folders."""
    return a.run[0] if len(a.run) == 1 else a.run


def cmd_evaluate(a: argparse.Namespace) -> int:
    # lazy: pulls torch, transformers and the models (seconds); `mtrec --help` must not
    from mtrec_dist.eval.evaluate import evaluate

    metrics = evaluate(_runs(a), split=a.split, num_workers=a.workers, overrides=a.overrides)
    print(json.dumps(metrics, indent=2))
    return 0


def cmd_predict(a: argparse.Namespace) -> int:
    # lazy: pulls torch, transformers and the models (seconds); `mtrec --help` must not
    from mtrec_dist.eval.predict import predict

    out = predict(_runs(a), split=a.split, out=a.out, num_workers=a.workers, overrides=a.overrides)
    print(f"wrote {out}")
    return 0


def cmd_score(a: argparse.Namespace) -> int:
    print(json.dumps(score_submission(a.pred, a.truth), indent=2))
    return 0


def cmd_demo(a: argparse.Namespace) -> int:
    # lazy: pulls torch, transformers and the models (seconds); `mtrec --help` must not
    from mtrec_dist.demo import run_demo

    run_demo(Path(a.out), config=a.config, overrides=a.overrides)
    return 0


EVAL_OVERRIDES_HELP = (
    "eval.* overrides of this call, e.g. eval.device=cpu (default auto: the node's GPUs when "
    "present, one worker each), eval.bf16=true, eval.encode_batch=2048"
)
RUN_HELP = (
    "run folder; repeat --run to ensemble several runs (mean of their raw scores per "
    "candidate; the runs must share the prepared folder and the tokenizer)"
)


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="mtrec", description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)

    p = sub.add_parser(
        "synth", help="write a synthetic MIND-format dataset with a planted click model"
    )
    p.add_argument("--out", required=True)
    p.add_argument("--scale", choices=["tiny", "small", "large"], default="small")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(fn=cmd_synth)

    p = sub.add_parser("prepare", help="tokenize news, write the news table, shards and manifest")
    _add_config_args(p)
    p.set_defaults(fn=cmd_prepare)

    p = sub.add_parser("train", help="train (Ray Train + DeepSpeed; local Ray when no cluster)")
    _add_config_args(p)
    p.add_argument("--resume", help="run folder to resume from (its last checkpoint)")
    p.set_defaults(fn=cmd_train)

    p = sub.add_parser(
        "tune-deepspeed", help="short trials over a DeepSpeed search space; rank, pick a winner"
    )
    _add_config_args(p)
    p.add_argument("--space", required=True, help="search space YAML (configs/tune/)")
    p.add_argument("--out", default=None, help="output folder (default: RUN_DIR/tune)")
    p.add_argument(
        "--retry-failed", action="store_true", help="on a rerun, run failed trials again"
    )
    p.set_defaults(fn=cmd_tune)

    p = sub.add_parser("evaluate", help="AUC/MRR/nDCG of a run (or an ensemble) on a labeled split")
    p.add_argument("--run", required=True, action="append", help=RUN_HELP)
    p.add_argument("--split", default="dev")
    p.add_argument("--workers", type=int, default=None)
    p.add_argument("overrides", nargs="*", help=EVAL_OVERRIDES_HELP)
    p.set_defaults(fn=cmd_evaluate)

    p = sub.add_parser("predict", help="write prediction.zip for the MIND leaderboard")
    p.add_argument("--run", required=True, action="append", help=RUN_HELP)
    p.add_argument("--split", default="test")
    p.add_argument("--out", default="prediction.zip")
    p.add_argument("--workers", type=int, default=None)
    p.add_argument("overrides", nargs="*", help=EVAL_OVERRIDES_HELP)
    p.set_defaults(fn=cmd_predict)

    p = sub.add_parser("score", help="score a prediction.txt/.zip against a truth.txt")
    p.add_argument("--pred", required=True)
    p.add_argument("--truth", required=True)
    p.set_defaults(fn=cmd_score)

    p = sub.add_parser("demo", help="synth -> prepare -> short training -> dev metrics")
    p.add_argument("--out", default="runs/demo")
    _add_config_args(p)
    p.set_defaults(fn=cmd_demo)
    return ap


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.fn(args)
    except (ConfigError, FileNotFoundError, ValueError, RunFolderBusy, TrainingFailed) as e:
        print(f"mtrec {args.cmd}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
