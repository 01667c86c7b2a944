r"""python -m vimjax.sweep --sweep=configs/sweeps/parti_shapes.py --workdir=/tmp/parti_shapes

L(N) of Parti on the embedded shapes dataset, on a 2-core CPU: a tiny
ViT-VQGAN and the token ids it writes (the `shapes_parti` prepare stage, run
once), then five Parti sizes from ~7k to ~0.9M non-embedding parameters (the
largest is configs/parti.py:tiny), each 400 steps of batch 32 (~0.8M image
tokens) with the tiny config's AdamW. The metric is the held-out loss in bits
per image token over 256 eval examples.
"""
import ml_collections


def size(name, dim, layers, heads):
  """One model size: width, depth (encoder = decoder layers), heads, MLP 4x."""
  return {"name": name, "model.emb_dim": dim, "model.mlp_dim": 4 * dim,
          "model.num_heads": heads, "model.encoder_layers": layers,
          "model.decoder_layers": layers}


def get_config():
  c = ml_collections.ConfigDict()
  c.base = "configs/parti.py:tiny"
  c.overrides = [{"total_steps": 400, "checkpoint_every_steps": 200, "eval_every_steps": 400,
                  "log_every_steps": 100, "num_eval_images": 256}]
  c.trials = [size("d16", 16, 1, 2), size("d32", 32, 1, 2), size("d64", 64, 1, 4),
              size("d96", 96, 2, 4), size("d128", 128, 2, 4)]
  c.grid = []
  c.metric = "eval_bits_per_token"
  c.fit_against = []
  c.with_offset = True
  c.prepare = "shapes_parti"
  c.prepare_args = dict(tokenizer_steps=300, num_train=4000, num_eval=256, vocab_size=256)
  c.lock()
  return c
