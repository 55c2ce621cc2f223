"""Prompt encoders: the target's input embeddings read from its GGUF, without a decoder pass."""

import numpy as np
import torch

from specrouter.core.model import load_hf_model
from specrouter.tasks.encoders import EmbeddingEncoder, encoder_for

CODE = "def add(a, b):\n    return a + b\n"
CHAT = "What should I cook for dinner tonight?"


def test_embed_encoder_is_the_mean_of_the_models_input_embeddings_over_the_prompt(smollm2_dir):
    encoder = encoder_for("embed:smollm2-135m")
    assert isinstance(encoder, EmbeddingEncoder) and encoder.name == "embed:smollm2-135m"
    model, tokenizer = load_hf_model(str(smollm2_dir), "float32")  # the same GGUF, dequantised by transformers
    got = encoder.encode([CODE, CHAT])  # [2, d]
    for row, text in zip(got, [CODE, CHAT]):
        ids = torch.tensor(tokenizer(text)["input_ids"])
        want = model.get_input_embeddings()(ids).mean(0).detach().numpy()
        assert np.allclose(row, want, atol=1e-3), np.abs(row - want).max()  # bf16 rounding of the converted weights
    assert got.dtype == np.float32 and not np.allclose(got[0], got[1])
