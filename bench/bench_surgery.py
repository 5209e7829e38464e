"""Cost of the fused surgery: the MTRec step (2 gradient groups, surgery ``mtrec``) against the
BERT-baseline step (1 group), on batches from the real training stream.

    python bench/bench_surgery.py --prepared DIR [--encoder minilm] [--batch 8] [--batches 4]
        [--steps 8] [--warmup 2] [--repeats 2] [--threads 1] [--out FILE]

DIR is a prepared folder with a ``train`` split (MIND-shaped: synthetic ``--scale large`` or
MIND). The timed batches are the first ``--batches`` batches of ``--batch`` samples of its
training stream (epoch 0, seed 0, history 50, K = 4, de-duplicated), so history lengths, title
lengths and repeats are the data's; every configuration runs the same ``--warmup`` + ``--steps``
steps over them, cycling. Single process, DeepSpeed ZeRO-2 fp32 (CUDA when there is one, else
CPU with ``--threads`` torch threads). A step is forward + every group's backward + surgery +
``engine.step()``.

Configurations, alternated ``--repeats`` times in one run (a fresh engine each time):

* ``bert``: the registered ``bert`` baseline, group ``main`` only, surgery ``none``;
* ``mtrec_one_group``: the registered ``mtrec`` with all its losses in one group (main + 0.3 x
  (category + ner)), surgery ``none``: the same forward as MTRec, one backward;
* ``mtrec``: the registered ``mtrec``, groups main and aux, surgery ``mtrec``.

Every ratio divides the summed step seconds of one configuration by those of another over the
same steps of the same run, process CPU seconds by CPU seconds (all torch threads of this
process) and wall seconds by wall seconds; ``per_repeat`` gives each repeat's own ratio:

* ``mtrec_over_bert``: the issue's "MTRec step / BERT-baseline step" (target <= 1.8x; the floor
  is ~5/3 = one forward and two backward passes against one of each, when the encoder
  dominates);
* ``mtrec_over_one_group``: the second backward and the surgery alone.

``surgery_share_of_step`` = MultiTaskGradients' own counter of its time beyond DeepSpeed's
backward and step (copy-out of the held group, Gram, combination; a wall-clock counter) over
the MTRec step's wall seconds (target <= 3%); ``extra_over_partition`` = its buffer over this
rank's gradient partition (target <= T-1 = 1). Writes bench/results/surgery.json.
"""

from __future__ import annotations

import argparse
import os
import sys
import warnings
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from _common import Stopwatch, batch_shape, free_port, loader_batches, ratio  # noqa: E402

from mtrec_dist.data.batch import Batch  # noqa: E402

MAIN_AUX = {"main": {"main": 1.0}, "aux": {"category": 0.3, "ner": 0.3}}
CONFIGS = {  # name -> (registered model, gradient groups, surgery)
    "bert": ("bert", {"main": {"main": 1.0}}, "none"),
    "mtrec_one_group": ("mtrec", {"all": {"main": 1.0, "category": 0.3, "ner": 0.3}}, "none"),
    "mtrec": ("mtrec", MAIN_AUX, "mtrec"),
}


def run_config(
    prepared: Path, encoder: str, config: str, batches: list[Batch], steps: int, warmup: int
) -> dict:
    """One fresh ZeRO-2 engine + MultiTaskGradients; step wall/CPU seconds after warm-up."""
    import deepspeed

    from mtrec_dist.config import Config
    from mtrec_dist.data.prepared import load_manifest
    from mtrec_dist.models.outputs import group_losses
    from mtrec_dist.models.registry import build_model
    from mtrec_dist.train.ds_engine import MultiTaskGradients

    name, groups, mode = CONFIGS[config]
    cfg = Config()
    cfg.data.prepared, cfg.model.name, cfg.model.encoder = str(prepared), name, encoder
    torch.manual_seed(0)
    model = build_model(cfg, load_manifest(prepared))
    ds = {
        "train_micro_batch_size_per_gpu": batches[0].sample_mask.numel(),
        "gradient_accumulation_steps": 1,
        "optimizer": {"type": "AdamW", "params": {"lr": 1e-5, "torch_adam": True}},
        "zero_optimization": {"stage": 2},
        "gradient_clipping": 0.0,
        "steps_per_print": 10**9,
    }
    engine, *_ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=ds)
    mtg = MultiTaskGradients(
        engine, model, list(groups), mode, "shared", model.shared_parameter_names()
    )
    dev = engine.device
    sw = Stopwatch(sync=torch.cuda.synchronize if dev.type == "cuda" else None)
    surgery_s, st = [], {}
    for i in range(warmup + steps):
        b = batches[i % len(batches)].to(dev)
        with sw:
            mtg.backward(group_losses(engine(b).losses, groups))
            st = mtg.step(i)
        if i >= warmup:
            surgery_s.append(st["surgery/time_s"])
    engine.destroy()
    return {
        **sw.summary(skip=warmup),
        "surgery_wall_s_total": sum(surgery_s),
        "extra_bytes": st["surgery/extra_bytes"],
        "partition_elems": st.get("surgery/partition_elems", 0.0),
    }


PAIRS = {"mtrec_over_bert": ("mtrec", "bert"), "mtrec_over_one_group": ("mtrec", "mtrec_one_group")}


def summarize(runs: dict[str, list[dict]], elem_bytes: int = 4) -> dict:
    """Ratios of the seconds summed over every repeat (and each repeat's own), the surgery's
    share of the MTRec step and its memory, from ``run_config`` results per configuration."""
    keys = ("blocks", "wall_s_total", "cpu_s_total", "surgery_wall_s_total")
    tot = {c: {k: sum(r[k] for r in rs) for k in keys} for c, rs in runs.items()}
    out: dict = {"totals": tot}
    for key, (num, den) in PAIRS.items():
        out[key] = {
            "cpu": tot[num]["cpu_s_total"] / tot[den]["cpu_s_total"],
            "wall": tot[num]["wall_s_total"] / tot[den]["wall_s_total"],
            "per_repeat": [ratio(a, b) for a, b in zip(runs[num], runs[den])],
        }
    m = runs["mtrec"][-1]
    partition = m["partition_elems"] * elem_bytes
    out["surgery_share_of_step"] = (
        tot["mtrec"]["surgery_wall_s_total"] / tot["mtrec"]["wall_s_total"]
    )
    out["extra_bytes"], out["partition_bytes"] = m["extra_bytes"], partition
    out["extra_over_partition"] = m["extra_bytes"] / max(1.0, partition)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--prepared", required=True, help="prepared folder with a train split")
    ap.add_argument("--encoder", default="minilm")
    ap.add_argument("--batch", type=int, default=8, help="samples per batch (micro batch)")
    ap.add_argument("--batches", type=int, default=4, help="distinct batches, cycled")
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--threads", type=int, default=1, help="torch threads on CPU")
    ap.add_argument("--out", default=str(ROOT / "bench/results/surgery.json"))
    a = ap.parse_args()
    warnings.filterwarnings("ignore", category=FutureWarning)
    torch.set_num_threads(a.threads)
    cuda = torch.cuda.is_available()
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=os.environ.get("MASTER_PORT") or str(free_port()),
        RANK="0",
        LOCAL_RANK="0",
        WORLD_SIZE="1",
    )
    os.environ.setdefault("DS_ACCELERATOR", "cuda" if cuda else "cpu")
    import deepspeed

    from mtrec_dist.utils import Progress, atomic_write_json

    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    deepspeed.init_distributed(dist_backend="nccl" if cuda else "gloo", verbose=False)

    prepared = Path(a.prepared)
    batches = loader_batches(prepared, batch_size=a.batch, n=a.batches)
    runs: dict[str, list[dict]] = {c: [] for c in CONFIGS}
    prog = Progress("surgery runs", a.repeats * len(CONFIGS), "runs", every=0.0)
    for _ in range(a.repeats):
        for c in CONFIGS:
            runs[c].append(run_config(prepared, a.encoder, c, batches, a.steps, a.warmup))
            prog.update(extra=f"{c}: {runs[c][-1]['cpu_s_total']:.1f} CPU s")
    res = {
        "encoder": a.encoder,
        "zero_stage": 2,
        "device": "cuda" if cuda else "cpu",
        "torch_threads": torch.get_num_threads(),
        "prepared": str(prepared),
        "batches": {"batch_size": a.batch, **batch_shape(batches)},
        "steps_per_run": a.steps,
        "warmup_per_run": a.warmup,
        "repeats": a.repeats,
        **summarize(runs),
        "runs": runs,
        "targets": {"mtrec_over_bert": 1.8, "floor": 5 / 3, "surgery_share_of_step": 0.03},
        "command": "python bench/bench_surgery.py " + " ".join(sys.argv[1:]),
    }
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(a.out, res)
    for k in ("batches", "mtrec_over_bert", "mtrec_over_one_group", "surgery_share_of_step",
              "extra_over_partition"):  # fmt: skip
        print(f"{k}: {res[k]}")


if __name__ == "__main__":
    main()
