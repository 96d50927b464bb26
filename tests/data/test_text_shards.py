"""Text-conditioned shards (flowmap_lit.data): prompt embeddings and pooled projections stored with the
latents, the null prompt, shape checks, the text-array preparation, and plain data without ``cond``."""

import json

import numpy as np
import pytest
import torch

from flowmap_lit.data import LatentDataModule, ShardError, read_stats, write_dataset
from tests.helpers.text import D, L, P, text_arrays, write_text_dataset


def test_text_shards_round_trip_with_null_prompt_and_stats(tmp_path):
    x, (emb, pooled), null = write_text_dataset(tmp_path / "t2i")
    stats = read_stats(str(tmp_path / "t2i"))
    assert stats["text"] == {"emb_shape": [L, D], "pooled_shape": [P], "null_file": "null_text.npz",
                             "encoder": "random"}
    dm = LatentDataModule(str(tmp_path / "t2i"), batch_size=8, num_workers=0, normalize=False, return_keys=True,
                          val_split="train")
    batches = list(dm.val_dataloader())
    idx = np.concatenate([[int(k.split("_")[1]) for k in b["key"]] for b in batches])
    got_emb = torch.cat([b["cond"]["encoder_hidden_states"] for b in batches]).numpy()
    got_pooled = torch.cat([b["cond"]["pooled_projections"] for b in batches]).numpy()
    assert got_emb.dtype == np.float32 and got_emb.shape == (32, L, D)
    np.testing.assert_array_equal(got_emb, emb[idx].astype(np.float16).astype(np.float32))  # stored as float16
    np.testing.assert_array_equal(got_pooled, pooled[idx].astype(np.float16).astype(np.float32))
    np.testing.assert_array_equal(torch.cat([b["x"] for b in batches]).numpy(), x[idx])
    null_cond = dm.null_cond
    np.testing.assert_allclose(null_cond["encoder_hidden_states"].numpy(), null[0], rtol=1e-6)
    assert null_cond["pooled_projections"].shape == (P,)


def test_text_shapes_are_checked_and_plain_data_has_no_cond(tmp_path):
    x, (emb, pooled) = text_arrays(8, 0)
    y = np.zeros(8, int)
    with pytest.raises(ValueError, match=r"text_emb must have shape \(N, L, D\)"):
        write_dataset(str(tmp_path / "a"), {"train": (x, y)}, 0, text={"train": (emb[:, 0], pooled)})
    with pytest.raises(ValueError, match=r"text_pooled must have shape \(N, D'\) with N = number of samples = 8"):
        write_dataset(str(tmp_path / "a"), {"train": (x, y)}, 0, text={"train": (emb, pooled[:5])})
    with pytest.raises(ValueError, match="null text text_emb has shape"):
        write_dataset(str(tmp_path / "a"), {"train": (x, y)}, 0, text={"train": (emb, pooled)},
                      null_text=(np.zeros((L + 1, D)), np.zeros(P)))
    # A stats.json whose shapes disagree with the shards: the reader names the member and both shapes.
    write_dataset(str(tmp_path / "b"), {"train": (x, y)}, 0, text={"train": (emb, pooled)})
    stats_path = tmp_path / "b/stats.json"
    stats = json.loads(stats_path.read_text())
    assert stats["text"]["null_file"] is None
    assert LatentDataModule(str(tmp_path / "b")).null_cond["pooled_projections"].abs().sum() == 0  # zeros
    stats["text"]["emb_shape"] = [L, D + 1]
    stats_path.write_text(json.dumps(stats))
    dm = LatentDataModule(str(tmp_path / "b"), batch_size=4, num_workers=0, val_split="train")
    with pytest.raises(ShardError, match=r"text_emb.npy has shape \(5, 8\) but stats.json says \(5, 9\)"):
        next(iter(dm.val_dataloader()))
    stats["text"]["emb_shape"] = [L * D]
    stats_path.write_text(json.dumps(stats))
    with pytest.raises(ValueError, match=r"text.emb_shape must be \[L, D\]"):
        read_stats(str(tmp_path / "b"))
    # The preparation CLI route from one .npz of arrays (no null prompt stored: CFG falls back to zeros).
    np.savez(tmp_path / "arrays.npz", x=np.concatenate([x, x]), text_emb=np.concatenate([emb, emb]),
             text_pooled=np.concatenate([pooled, pooled]))
    from flowmap_lit.commands.prepare import main as prepare_main

    stats = prepare_main(["text-array", "--src", str(tmp_path / "arrays.npz"), "--out", str(tmp_path / "d"),
                          "--val-fraction", "0.25", "--text-encoder", "random"])
    assert stats["text"]["emb_shape"] == [L, D] and stats["splits"]["val"]["num_samples"] == 4
    # Data without text: batches exactly as before (no "cond").
    write_dataset(str(tmp_path / "c"), {"train": (x, y)}, 1)
    batch = next(iter(LatentDataModule(str(tmp_path / "c"), batch_size=4, num_workers=0, val_split="train")
                      .val_dataloader()))
    assert set(batch) == {"x", "label"}
