"""Prompt text stored with the text embeddings, prompts-only datasets (``prepare text-prompts``) and the
``PromptDataModule`` that serves them without latents."""

import json

import numpy as np
import pytest
import torch

from flowmap_lit.commands.prepare import main as prepare_main
from flowmap_lit.data import LatentDataModule, PromptDataModule, read_stats, write_dataset
from tests.helpers.text import D, L, P, text_arrays

PROMPTS = ["a red cube", "two green balls", "a blue sky", "an orange cat", "a dog on grass", "night city",
           "snowy mountain", "a small boat", "yellow flowers", "a quiet street"]


def test_prompt_text_is_stored_with_the_embeddings_and_reaches_the_batches(tmp_path):
    x, text = text_arrays(6, 0)
    xv, tv = text_arrays(4, 1)
    prompts = {"train": PROMPTS[:6], "val": ["é ü 日本", "", "b", "c"]}  # UTF-8 and an empty prompt survive
    write_dataset(str(tmp_path / "t"), {"train": (x, np.zeros(6, int)), "val": (xv, np.zeros(4, int))}, 0,
                  samples_per_shard=4, text={"train": text, "val": tv}, prompts=prompts)
    assert read_stats(str(tmp_path / "t"))["text"]["prompts"] is True
    dm = LatentDataModule(str(tmp_path / "t"), batch_size=3, val_batch_size=3, num_workers=0, normalize=False)
    batches = list(dm.val_dataloader())
    assert [p for b in batches for p in b["prompt"]] == prompts["val"]
    assert all(len(b["prompt"]) == len(b["x"]) == len(b["cond"]["encoder_hidden_states"]) for b in batches)
    train = next(iter(dm.train_dataloader()))
    assert len(train["prompt"]) == 3 and set(train["prompt"]) <= set(prompts["train"])
    # The training stream keeps sample and prompt together.
    rows = {tuple(np.round(x[i].ravel()[:4], 5)): PROMPTS[i] for i in range(6)}
    for i, p in enumerate(train["prompt"]):
        assert rows[tuple(np.round(train["x"][i].numpy().ravel()[:4], 5))] == p
    with pytest.raises(ValueError, match="1 prompts for 6 samples"):
        write_dataset(str(tmp_path / "u"), {"train": (x, np.zeros(6, int))}, 0, text={"train": text},
                      prompts={"train": ["one"]})
    with pytest.raises(ValueError, match="pass text= too"):
        write_dataset(str(tmp_path / "u"), {"train": (x, np.zeros(6, int))}, 0, prompts={"train": PROMPTS[:6]})


def test_prompt_batches_move_to_a_device_with_lightning():
    from lightning.pytorch.core.module import LightningModule

    batch = {"label": torch.zeros(2, dtype=torch.long), "prompt": ["a", "b"],
             "cond": {"encoder_hidden_states": torch.zeros(2, L, D)}}
    moved = LightningModule()._apply_batch_transfer_handler(batch, torch.device("cpu"))
    assert moved["prompt"] == ["a", "b"] and moved["cond"]["encoder_hidden_states"].shape == (2, L, D)


def test_text_array_route_stores_prompts(tmp_path):
    x, (emb, pooled) = text_arrays(10, 0)
    np.savez(tmp_path / "a.npz", x=x, text_emb=emb, text_pooled=pooled, prompt=np.array(PROMPTS))
    prepare_main(["text-array", "--src", str(tmp_path / "a.npz"), "--out", str(tmp_path / "t"),
                  "--val-fraction", "0.3"])
    dm = LatentDataModule(str(tmp_path / "t"), batch_size=4, num_workers=0, normalize=False, return_keys=True,
                          val_split="val")
    got = [p for b in dm.val_dataloader() for p in b["prompt"]]
    assert len(got) == 3 and set(got) <= set(PROMPTS)


def check_prompts_only(root, prompts, emb_shape, pooled_shape, null_expected=None):
    """Reads the prompts-only dataset at ``root`` back: batches without latents, with cond and prompts."""
    stats = read_stats(str(root))
    assert stats["kind"] == "prompts" and stats["shape"] is None and stats["text"]["prompts"] is True
    assert stats["text"]["emb_shape"] == emb_shape and stats["text"]["pooled_shape"] == pooled_shape
    assert stats["splits"]["train"]["num_samples"] + stats["splits"]["val"]["num_samples"] == len(prompts)
    dm = PromptDataModule(str(root), shape=[4, 8, 8], batch_size=3, val_batch_size=2, num_workers=0,
                          return_keys=True)
    dm.setup("fit")
    assert dm.shape == (4, 8, 8) and dm.num_classes == 0 and not dm.normalize
    assert dm.stats["mean"] == [0.0] * 4 and dm.text["emb_shape"] == emb_shape
    x = torch.randn(2, 4, 8, 8)
    assert torch.equal(dm.denormalize(x), x)
    batch = next(iter(dm.train_dataloader()))
    assert "x" not in batch and set(batch) == {"label", "key", "cond", "prompt"}
    assert batch["cond"]["encoder_hidden_states"].shape == (3, *emb_shape)
    assert batch["cond"]["pooled_projections"].shape == (3, *pooled_shape)
    assert batch["cond"]["encoder_hidden_states"].dtype == torch.float32
    assert len(batch["prompt"]) == 3 and set(batch["prompt"]) <= set(prompts)
    val = [p for b in dm.val_dataloader() for p in b["prompt"]]
    assert len(val) == stats["splits"]["val"]["num_samples"] and set(val) <= set(prompts)
    null = dm.null_cond
    assert null["encoder_hidden_states"].shape == tuple(emb_shape)
    if null_expected is not None:
        np.testing.assert_allclose(null["encoder_hidden_states"].numpy(), null_expected, rtol=1e-6)
    # What the distillation module records from a data module: the configured latent shape, no normalization.
    from types import SimpleNamespace

    from flowmap_lit.modules.common import data_info

    info = data_info(SimpleNamespace(datamodule=dm))
    assert info["shape"] == [4, 8, 8] and info["num_classes"] == 0 and info["normalize"] is False
    return dm, batch


def test_prepare_text_prompts_from_a_local_clip_encoder(tmp_path):
    pytest.importorskip("transformers")
    from tests.helpers.clip import tiny_text_encoder

    model = tiny_text_encoder(tmp_path / "clip")
    (tmp_path / "prompts.txt").write_text("\n".join(PROMPTS[:7]) + "\n\n  \n", encoding="utf-8")
    stats = prepare_main(["text-prompts", "--prompts", str(tmp_path / "prompts.txt"), "--encoder",
                          str(tmp_path / "clip"), "--out", str(tmp_path / "p"), "--val-fraction", "0.3",
                          "--samples-per-shard", "2", "--clip-max-length", "12"])
    assert stats["source"].startswith("python -m flowmap_lit prepare text-prompts")
    # SD3's CLIP embedding: the penultimate hidden state of 12 padded tokens, and the pooled projection.
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(tmp_path / "clip"))
    ids = tokenizer(["", PROMPTS[0]], padding="max_length", max_length=12, truncation=True,
                    return_tensors="pt").input_ids
    with torch.no_grad():
        out = model(ids, output_hidden_states=True)
    dm, _ = check_prompts_only(tmp_path / "p", PROMPTS[:7], [12, 16], [8], out.hidden_states[-2][0].numpy())
    np.testing.assert_allclose(dm.null_cond["pooled_projections"].numpy(), out.text_embeds[0].numpy(), rtol=1e-5,
                               atol=1e-6)
    stored = {}  # prompt -> its stored embedding (float16), from both splits
    for split in ("train", "val"):
        dm = PromptDataModule(str(tmp_path / "p"), shape=[4, 8, 8], num_workers=0, val_split=split)
        for batch in dm.val_dataloader():
            stored.update(zip(batch["prompt"], batch["cond"]["encoder_hidden_states"]))
    assert sorted(stored) == sorted(PROMPTS[:7])
    torch.testing.assert_close(stored[PROMPTS[0]], out.hidden_states[-2][1], rtol=2e-3, atol=2e-3)
    with pytest.raises(FileNotFoundError, match="hf download"):
        prepare_main(["text-prompts", "--prompts", str(tmp_path / "prompts.txt"), "--encoder",
                      str(tmp_path / "nowhere"), "--out", str(tmp_path / "q")])


def test_prepare_text_prompts_from_precomputed_embeddings(tmp_path):
    n = len(PROMPTS)
    rng = np.random.default_rng(0)
    emb, pooled = rng.standard_normal((n, L, D)).astype(np.float32), rng.standard_normal((n, P)).astype(np.float32)
    null = rng.standard_normal((L, D)).astype(np.float32)
    np.savez(tmp_path / "e.npz", prompt_embeds=emb, pooled_prompt_embeds=pooled, null_text_emb=null,
             null_text_pooled=np.zeros(P, np.float32))
    (tmp_path / "prompts.txt").write_text("\n".join(PROMPTS), encoding="utf-8")
    prepare_main(["text-prompts", "--prompts", str(tmp_path / "prompts.txt"), "--embeddings", str(tmp_path / "e.npz"),
                  "--out", str(tmp_path / "p")])
    check_prompts_only(tmp_path / "p", PROMPTS, [L, D], [P], null)
    # Every prompt keeps its own embedding.
    dm = PromptDataModule(str(tmp_path / "p"), shape=[4, 8, 8], num_workers=0, val_split="train", val_batch_size=64)
    batch = next(iter(dm.val_dataloader()))
    for i, prompt in enumerate(batch["prompt"]):
        np.testing.assert_array_equal(batch["cond"]["encoder_hidden_states"][i].numpy(),
                                      emb[PROMPTS.index(prompt)].astype(np.float16).astype(np.float32))
    # The wrong module for each kind of dataset says which one to use; a count mismatch is refused.
    with pytest.raises(ValueError, match="PromptDataModule"):
        LatentDataModule(str(tmp_path / "p")).load_stats()
    write_dataset(str(tmp_path / "lat"), {"train": (text_arrays(4, 0)[0], np.zeros(4, int))}, 0)
    with pytest.raises(ValueError, match="LatentDataModule"):
        PromptDataModule(str(tmp_path / "lat"), shape=[4, 8, 8]).setup()
    np.savez(tmp_path / "short.npz", text_emb=emb[:3])
    with pytest.raises(ValueError, match="3 embeddings but"):
        prepare_main(["text-prompts", "--prompts", str(tmp_path / "prompts.txt"), "--embeddings",
                      str(tmp_path / "short.npz"), "--out", str(tmp_path / "q")])
    stats = json.loads((tmp_path / "p/stats.json").read_text())
    assert stats["mean"] == [] and stats["num_classes"] == 0


def test_sd3_and_flux_styles_combine_clip_and_t5_encoders_of_a_pipeline_folder(tmp_path):
    pytest.importorskip("transformers")
    from transformers import CLIPTextModel, CLIPTextModelWithProjection, T5Config, T5EncoderModel

    from flowmap_lit.data import encode_prompts
    from tests.helpers.clip import text_config, tiny_tokenizer

    torch.manual_seed(0)
    t5 = T5EncoderModel(T5Config(vocab_size=54, d_model=48, d_kv=8, d_ff=64, num_layers=1, num_heads=2,
                                 pad_token_id=1, eos_token_id=1, decoder_start_token_id=0)).eval()
    models = {"sd3": [CLIPTextModelWithProjection(text_config()), CLIPTextModelWithProjection(text_config(hidden=24)),
                      t5],
              "flux": [CLIPTextModel(text_config()), t5]}
    prompts = ["a red cube", "a dog"]
    tokenizer = tiny_tokenizer(tmp_path / "tokenizer")  # every encoder's tokenizer is this one
    for style, encoders in models.items():
        root = tmp_path / style
        for i, model in enumerate(encoders):
            suffix = "" if i == 0 else f"_{i + 1}"
            model.eval().save_pretrained(str(root / f"text_encoder{suffix}"))
            tiny_tokenizer(root / f"tokenizer{suffix}")
        tokens, pooled = encode_prompts(prompts, root, style, clip_max_length=12, t5_max_length=7)

        def ids(n):
            return tokenizer(prompts, padding="max_length", max_length=n, truncation=True,
                             return_tensors="pt").input_ids

        with torch.no_grad():
            t5_out = t5(ids(7)).last_hidden_state.numpy()
            if style == "sd3":  # [CLIP-L | CLIP-G | zeros] on 12 tokens, then T5's 7 tokens; pooled [L | G]
                outs = [m(ids(12), output_hidden_states=True) for m in encoders[:2]]
                assert tokens.shape == (2, 12 + 7, 48) and pooled.shape == (2, 16)
                np.testing.assert_allclose(tokens[:, :12, :16], outs[0].hidden_states[-2].numpy(), rtol=1e-5, atol=1e-5)
                np.testing.assert_allclose(tokens[:, :12, 16:40], outs[1].hidden_states[-2].numpy(), rtol=1e-5,
                                           atol=1e-5)
                assert not tokens[:, :12, 40:].any()
                np.testing.assert_allclose(pooled, np.concatenate([o.text_embeds.numpy() for o in outs], -1),
                                           rtol=1e-5, atol=1e-5)
            else:  # T5's tokens, CLIP's pooled output
                out = encoders[0](ids(12))
                assert tokens.shape == (2, 7, 48) and pooled.shape == (2, 16)
                np.testing.assert_allclose(pooled, out.pooler_output.numpy(), rtol=1e-5, atol=1e-5)
            np.testing.assert_allclose(tokens[:, -7:], t5_out, rtol=1e-5, atol=1e-5)
