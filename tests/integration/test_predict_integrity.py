"""`predict` end to end on hand-written MIND files: ids reach prediction.txt as the source spells
them, and a truncated test shard stops predict with an error naming the shard (before this,
the cut shard read as a shorter one and prediction.zip silently lost its impressions)."""

from __future__ import annotations

import json
import tarfile
import zipfile

import pytest

from mtrec_dist.data.prepare import prepare
from mtrec_dist.data.tables import DataError
from mtrec_dist.eval import predict as P
from tests.integration.test_predict import make_run
from tests.unit.test_prepare import _imp, make_cfg, write_dataset

TEST_IDS = ["003", "3", "0007"]


@pytest.fixture
def run(tmp_path):
    from mtrec_dist.data import mind

    write_dataset(tmp_path / "raw")
    mind.write_behaviors(
        tmp_path / "raw/test/behaviors.tsv",
        [_imp(TEST_IDS[0], ["N1", "N2"], ["N4", "N5"], None),
         _imp(TEST_IDS[1], [], ["N3"], None),
         _imp(TEST_IDS[2], ["N3"], ["N5", "N1", "N2"], None)],
    )  # fmt: skip
    cfg = make_cfg(tmp_path / "raw", f"data.prepared={tmp_path / 'prepared'}")
    prepare(cfg, progress=False, workers=1)
    manifest = json.loads((cfg.prepared_dir / "manifest.json").read_text())
    return make_run(tmp_path, cfg, manifest, "run"), cfg


def test_ids_reach_prediction_txt_unchanged(run, tmp_path):
    run_dir, _ = run
    out = P.predict(run_dir, "test", out=tmp_path / "p.zip", num_workers=1)
    with zipfile.ZipFile(out) as zf:
        lines = zf.read("prediction.txt").decode().splitlines()
    assert [ln.split(" ")[0] for ln in lines] == TEST_IDS


def test_truncated_test_shard_stops_predict_naming_it(run, tmp_path):
    run_dir, cfg = run
    shard = cfg.prepared_dir / "shards/test-000000.tar"
    with tarfile.open(shard) as tf:
        (group,) = tf.getmembers()  # the 3 impressions are one group (one tar member)
    end = group.offset_data + -(-group.size // 512) * 512
    shard.write_bytes(shard.read_bytes()[:end])  # cut after the member: no end-of-archive marker
    out = tmp_path / "p.zip"
    with pytest.raises(DataError) as e:
        P.predict(run_dir, "test", out=out, num_workers=1)
    assert str(e.value).startswith(
        f"{shard}: truncated: the file ends after member '000000.imps.bin' without the tar "
        "end-of-archive marker"
    )
    assert not out.exists()
