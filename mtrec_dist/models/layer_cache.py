"""Train the top encoder layers over an exact per-news cache of the frozen ones (docs/design.md §3.1).

Why: PLM-based news recommenders train only the top layers of the PLM (PLM-NR: the last 2 of
8; Tiny-NewsRec: the last 2). With the embeddings and the lower layers frozen
(``model.train_layers=N``), their output for a title never changes, so it is computed once per
news, kept in a memory-mapped file and read back instead of recomputed at every step and every
evaluation (Legommenders' layer cache). Unlike a cache of *trainable* outputs this is exact:
the frozen part always runs without dropout, so the uncached path computes the same numbers.

Pieces:

* :func:`frozen_layer_count`, :func:`freeze_prefix`: which layers are frozen and freezing them;
* :func:`prefix_states` / :func:`top_states`: the frozen part (embeddings + the lower layers,
  eval mode, no gradient) and the trained top, run by hand with the mask BertModel itself builds,
  so that ``top_states(prefix_states(x)) == bert(x).last_hidden_state`` at every real token;
* :class:`PrefixCache`: the read side, ``states[rows, :L]`` of a ``[N, L_title, D]`` float32
  array, one row per news-table row;
* :func:`build_cache`: the write side, shared by every process of a node that calls it
  (training workers, the reference trainer, benchmarks): chunks of news are claimed with
  exclusive-create files, so the processes build disjoint chunks in parallel; a chunk is marked
  done only after its rows are on disk, so an interrupted build resumes where it stopped; a
  claim whose process is gone (same host) is taken over; waiting has a deadline.

The cache lives in ``<prepared>/layer_cache/<key[:16]>/`` where the key is the sha256 of the
frozen weights, the frozen layer count, the title length, the hidden size and the news table's
tokens: another encoder, another cut or re-prepared titles give another folder.
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
import time
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import nn
from transformers.masking_utils import create_bidirectional_mask

from mtrec_dist.config import ConfigError
from mtrec_dist.data.batch import NewsTable
from mtrec_dist.models.base import NewsRecModel
from mtrec_dist.utils import Progress, atomic_write_json

if TYPE_CHECKING:  # encoders imports this module: a runtime import would be a cycle
    from mtrec_dist.models.encoders import NewsEncoder

CACHE_FORMAT = 1
CHUNK_ROWS = 512  # news per build chunk (one forward pass of the frozen part)
POLL_S = 0.5


def frozen_layer_count(bert: nn.Module, train_layers: int) -> int | None:
    """Transformer layers below the trained top for ``model.train_layers`` (None: all train).

    ``0`` trains everything (the papers); ``N > 0`` trains the top N layers (the embeddings and
    the layers below are frozen); ``-1`` freezes the whole encoder (its last hidden states are
    cached and only the layers above the encoder train)."""
    n = len(bert.encoder.layer)
    if train_layers == 0:
        return None
    if train_layers == -1:
        return n
    if not 0 < train_layers <= n:
        raise ConfigError(
            f"model.train_layers={train_layers}: the encoder has {n} layers (after "
            f"model.encoder_layers); allowed: 0 (all), 1..{n} (the top N), -1 (none)"
        )
    return n - train_layers


def prefix_modules(bert: nn.Module, k: int) -> list[nn.Module]:
    return [bert.embeddings, *bert.encoder.layer[:k]]


def freeze_prefix(bert: nn.Module, k: int) -> None:
    """Embeddings and the first ``k`` layers: no gradient, eval mode (no dropout)."""
    for m in prefix_modules(bert, k):
        m.eval()
        for p in m.parameters():
            p.requires_grad_(False)


def _mask(bert: nn.Module, hidden: torch.Tensor, attention_mask: torch.Tensor):
    """The attention mask BertModel.forward builds for these inputs (same function, same
    attention implementation), so the layers run by hand see exactly what they see inside it."""
    return create_bidirectional_mask(
        config=bert.config, inputs_embeds=hidden, attention_mask=attention_mask
    )


@torch.no_grad()
def prefix_states(
    bert: nn.Module, k: int, tokens: torch.Tensor, attention_mask: torch.Tensor
) -> torch.Tensor:
    """Output of the embeddings and the first ``k`` layers: tokens [U, L] -> [U, L, D].

    Always in eval mode (no dropout), whatever mode the model is in: that is what makes the
    cached and the uncached paths equal."""
    mods = prefix_modules(bert, k)
    modes = [m.training for m in mods]
    for m in mods:
        m.eval()
    try:
        h = bert.embeddings(input_ids=tokens)  # [U, L, D]
        mask = _mask(bert, h, attention_mask)
        for layer in bert.encoder.layer[:k]:
            h = layer(h, mask)
    finally:
        for m, was in zip(mods, modes):
            m.train(was)
    return h


def top_states(
    bert: nn.Module, k: int, hidden: torch.Tensor, attention_mask: torch.Tensor
) -> torch.Tensor:
    """The trained layers ``k..`` on the frozen part's output: [U, L, D] -> [U, L, D]."""
    layers = bert.encoder.layer[k:]
    if len(layers) == 0:
        return hidden
    mask = _mask(bert, hidden, attention_mask)
    for layer in layers:
        hidden = layer(hidden, mask)
    return hidden


def cache_key(bert: nn.Module, k: int, tokens: np.ndarray) -> str:
    """sha256 of what the cached numbers depend on: format, frozen layer count, the shape of
    the title table and its word pieces, and every frozen parameter and buffer, by name."""
    h = hashlib.sha256()
    h.update(json.dumps({"format": CACHE_FORMAT, "k": k, "shape": list(tokens.shape)}).encode())
    h.update(np.ascontiguousarray(tokens).tobytes())
    prefixes = ("embeddings.",) + tuple(f"encoder.layer.{i}." for i in range(k))
    state = bert.state_dict()
    for name in sorted(state):
        if name.startswith(prefixes):
            t = state[name].detach().to("cpu").contiguous()
            h.update(name.encode())
            h.update(str(t.dtype).encode())
            h.update(
                t.numpy().tobytes() if t.dtype != torch.bfloat16 else t.float().numpy().tobytes()
            )
    return h.hexdigest()


class PrefixCache:
    """The frozen part's output for every news-table row: ``states`` [N, L_title, D] float32.

    Positions past a title's end hold zeros; they are padding keys the trained layers mask out,
    and the pooling and the NER loss ignore them."""

    def __init__(self, folder: Path, prepared: Path, key: str):
        self.folder = folder
        self.prepared = prepared
        self.key = key
        self.states = np.load(folder / "states.npy", mmap_mode="r")  # [N, L, D]

    def lookup(self, rows: torch.Tensor, length: int) -> torch.Tensor:
        """rows [U] -> the cached states [U, length, D] (a copy; rows in any order)."""
        idx = rows.detach().to("cpu").numpy()
        return torch.from_numpy(np.ascontiguousarray(self.states[idx, :length]))


def cache_folder(prepared: str | Path, key: str) -> Path:
    return Path(prepared) / "layer_cache" / key[:16]


def open_cache(encoder: NewsEncoder, prepared: str | Path) -> PrefixCache | None:
    """The complete cache of ``encoder``'s frozen part on ``prepared``'s news table, else None."""
    k = encoder.frozen_layers
    if k is None:
        return None
    key = cache_key(encoder.bert, k, NewsTable(prepared).tokens)
    folder = cache_folder(prepared, key)
    if not (folder / "COMPLETE").is_file():
        return None
    return PrefixCache(folder, Path(prepared), key)


def _holder_gone(claim: Path) -> bool:
    """A claim file holds 'host pid'; on this host a pid that no longer runs has let go."""
    try:
        host, pid = claim.read_text().split()
    except (OSError, ValueError):
        return False  # being written right now
    if host != socket.gethostname():
        return False  # another node's process: only the deadline can tell
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return False


def _try_claim(path: Path) -> bool:
    try:
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
        return False
    with os.fdopen(fd, "w") as f:
        f.write(f"{socket.gethostname()} {os.getpid()}")
    return True


def build_cache(
    encoder: NewsEncoder,
    prepared: str | Path,
    *,
    rank: int = 0,
    world: int = 1,
    deadline_s: float = 1800.0,
    progress: bool = True,
    chunk_rows: int = CHUNK_ROWS,
) -> PrefixCache | None:
    """Open the cache of ``encoder``'s frozen part, building what is missing (None when the
    encoder trains every layer).

    Every process of a node that calls this at the same time builds a share: it starts with
    chunks (``chunk_rows`` news each) ``rank, rank + world, ...`` and then helps with any chunk nobody claimed. A chunk is
    done once its ``chunks/NNNNNN.done`` exists (written after its rows were flushed), so a
    build that was killed resumes; a claim left by a dead process on this host is taken over.
    Raises TimeoutError naming the folder and the missing chunks after ``deadline_s``."""
    k = encoder.frozen_layers
    if k is None:
        return None
    bert = encoder.bert
    table = NewsTable(prepared)
    key = cache_key(bert, k, table.tokens)
    folder = cache_folder(prepared, key)
    if (folder / "COMPLETE").is_file():
        return PrefixCache(folder, Path(prepared), key)
    chunks_dir = folder / "chunks"
    chunks_dir.mkdir(parents=True, exist_ok=True)
    N, L = table.tokens.shape
    D = int(bert.config.hidden_size)
    path = folder / "states.npy"
    if not path.is_file():  # one creator wins the link; the others open its file
        tmp = folder / f"states.npy.tmp-{socket.gethostname()}-{os.getpid()}"
        np.lib.format.open_memmap(tmp, mode="w+", dtype=np.float32, shape=(N, L, D)).flush()
        try:
            os.link(tmp, path)
        except FileExistsError:
            pass
        finally:
            tmp.unlink()
    states = np.load(path, mmap_mode="r+")
    n_chunks = (N + chunk_rows - 1) // chunk_rows
    done = lambda i: (chunks_dir / f"{i:06d}.done").is_file()  # noqa: E731
    claim = lambda i: chunks_dir / f"{i:06d}.claim"  # noqa: E731
    mine = list(range(rank, n_chunks, max(world, 1)))
    taken = set(mine)
    order = mine + [i for i in range(n_chunks) if i not in taken]
    device = next(bert.parameters()).device
    bar = Progress("layer cache", n_chunks, unit="chunks") if progress and rank == 0 else None
    t0, built = time.monotonic(), 0
    deadline = t0 + deadline_s
    while True:
        for i in order:
            if done(i):
                continue
            c = claim(i)
            if not _try_claim(c):
                if not _holder_gone(c):
                    continue
                c.unlink(missing_ok=True)  # its holder died: take it over
                if not _try_claim(c):
                    continue
            lo, hi = i * chunk_rows, min(N, (i + 1) * chunk_rows)
            tok = np.asarray(table.tokens[lo:hi], dtype=np.int64)
            attn = tok != 0
            Lc = max(int(attn.sum(1).max()), 1)
            out = prefix_states(
                bert,
                k,
                torch.from_numpy(tok[:, :Lc]).to(device),
                torch.from_numpy(attn[:, :Lc].astype(np.int64)).to(device),
            )
            out = out.float().cpu().numpy() * attn[:, :Lc, None]  # padding positions: 0
            states[lo:hi, :Lc] = out
            states[lo:hi, Lc:] = 0.0
            states.flush()
            (chunks_dir / f"{i:06d}.done").write_text(f"{socket.gethostname()} {os.getpid()}")
            built += 1
            if bar is not None:
                bar.update(1)
        missing = [i for i in range(n_chunks) if not done(i)]
        if not missing:
            break
        if time.monotonic() > deadline:
            raise TimeoutError(
                f"{folder}: layer cache not complete after {deadline_s:.0f} s; chunks "
                f"{missing[:5]}{' ...' if len(missing) > 5 else ''} are claimed by processes "
                f"that did not finish (their claims are in {chunks_dir}); remove the folder "
                "to rebuild it"
            )
        time.sleep(POLL_S)
    del states
    if not (folder / "COMPLETE").is_file():
        atomic_write_json(
            folder / "COMPLETE",
            {
                "format": CACHE_FORMAT,
                "key": key,
                "frozen_layers": k,
                "news": int(N),
                "title_len": int(L),
                "hidden": D,
                "bytes": int(N) * int(L) * D * 4,
                "seconds": time.monotonic() - t0,
                "chunks_built_by_last_writer": built,
            },
        )
    if bar is not None:
        bar.close()
    return PrefixCache(folder, Path(prepared), key)


def attach(
    model: nn.Module,
    prepared: str | Path,
    *,
    build: bool = True,
    rank: int = 0,
    world: int = 1,
    deadline_s: float = 1800.0,
    progress: bool = True,
) -> PrefixCache | None:
    """Give ``model.encoder`` the cache of its frozen part on ``prepared`` (built when missing
    and ``build``; the evaluator only opens a complete one). A model whose encoder trains every
    layer, or has no such encoder (no ``pretrained_encoder()``, or a plain module outside the
    model contract, such as the evaluator tests' stand-ins), is left alone. The frozen weights
    never change, so a cache already attached for the same prepared folder is kept."""
    enc = model.pretrained_encoder() if isinstance(model, NewsRecModel) else None
    if enc is None or enc.frozen_layers is None:
        return None
    if enc.cache is not None and enc.cache.prepared == Path(prepared):
        return enc.cache
    if build:
        cache = build_cache(
            enc, prepared, rank=rank, world=world, deadline_s=deadline_s, progress=progress
        )
    else:
        cache = open_cache(enc, prepared)
    enc.cache = cache
    return cache
