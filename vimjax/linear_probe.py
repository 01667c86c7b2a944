r"""python -m vimjax.linear_probe --workdir=VIM_WORKDIR --block=15

The VIM linear probe (ViT-VQGAN paper, Table 4): the frozen VIM of a workdir,
token-averaged features of block N (1-based; --block repeatable, one head per
block), a linear softmax head trained with optax on the train split, top-1
accuracy on the eval split against chance. See vimjax/evaluation/linear_probe.py.

The data is the workdir's `data.source` (the token records of
`python -m vimjax.encode`, which carry labels); any labelled source works
through --config.data.source (image sources such as `shapes` or
`tfds:imagenet2012` are tokenized by the config's tokenizer_workdir). Final JSON
line: {"accuracy": {block: top-1}, "best_block", "chance", ...}.
"""

from absl import app
from absl import flags

from vimjax import checkpoint
from vimjax import errors
from vimjax import runtime
from vimjax.evaluation import linear_probe


def _define_flags():
  """Flags of the binary (defined only when run as a program: --workdir is shared)."""
  flags.DEFINE_string("workdir", None, "A VIM training workdir.")
  flags.DEFINE_multi_integer("block", [], "Block to probe, 1..num_layers (repeatable).")
  flags.DEFINE_integer("num_train_examples", 0, "Train examples for the head (0 = the split).")
  flags.DEFINE_integer("num_eval_examples", 0, "Eval examples (0 = the split).")
  flags.DEFINE_integer("steps", 2000, "Optimizer steps of the linear head.")
  flags.DEFINE_integer("batch_size", 512, "Examples per head step.")
  flags.DEFINE_float("lr", 1e-2, "Peak AdamW learning rate of the head (cosine decay).")
  flags.DEFINE_float("weight_decay", 1e-4, "Decoupled weight decay of the head's kernel.")
  flags.DEFINE_integer("seed", 0, "Head init / minibatch seed.")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  f = flags.FLAGS
  runtime.initialize()
  try:
    result = linear_probe.run(
        f.config, f.workdir, blocks=f.block, num_train_examples=f.num_train_examples,
        num_eval_examples=f.num_eval_examples, steps=f.steps, batch_size=f.batch_size,
        lr=f.lr, weight_decay=f.weight_decay, seed=f.seed)
  except (ValueError, FileNotFoundError) as e:
    raise SystemExit(f"error: {e}") from None
  runtime.emit_result(result, f.workdir, "linear_probe_result")


if __name__ == "__main__":
  _define_flags()
  runtime.define_config_from_workdir("workdir", checkpoint.load_workdir_config)
  errors.run(main)
