"""Stages a sweep runs once, before its trials, whose outputs every trial reads.

A stage is `fn(directory, **prepare_args) -> {dotted config key: value}`; the
returned overrides are added to every trial's train command. It writes
DIRECTORY/prepare.json when done, so a re-run sweep skips it (a stage whose
own steps resume, like training, also resumes if it was interrupted).

Stage-2 sweeps at paper scale point `overrides` at tokens written once by
`python -m vimjax.encode` and need no stage.
"""
import json
import os
import time

from absl import logging


def shapes_parti(directory: str, *, tokenizer_steps: int, num_train: int, num_eval: int,
                 vocab_size: int) -> dict:
  """Tiny ViT-VQGAN on shapes -> token ids of `num_train`/`num_eval` images -> SentencePiece.

  The demo's stages 1-3 (vimjax.demo), at sizes picked by the sweep file.
  Returns the Parti overrides: tokenizer_workdir, data.source, data.text_tokenizer.
  """
  # Imported here: the launchers and --collect do not need jax's training stack.
  from vimjax import encoding  # pylint: disable=g-import-not-at-top
  from vimjax.configs import vitvqgan  # pylint: disable=g-import-not-at-top
  from vimjax.data import vocab  # pylint: disable=g-import-not-at-top
  from vimjax.train import loop  # pylint: disable=g-import-not-at-top
  tok_dir, tokens = os.path.join(directory, "tokenizer"), os.path.join(directory, "tokens")
  tok_config = vitvqgan.get_config("tiny")
  with tok_config.unlocked():
    tok_config.total_steps = tokenizer_steps
    tok_config.eval_every_steps = tokenizer_steps
    tok_config.checkpoint_every_steps = min(tok_config.checkpoint_every_steps, tokenizer_steps)
  logging.info("prepare shapes_parti: tiny ViT-VQGAN, %d steps.", tokenizer_steps)
  loop.train_and_evaluate(tok_config, tok_dir)
  for split, n in (("train", num_train), ("eval", num_eval)):
    encoding.run(tok_config, tok_dir, os.path.join(tokens, split), splits=(split,),
                 num_examples=n, overwrite=True)
  spm = vocab.run("shapes", "train", 2000, vocab_size, os.path.join(directory, "spm"),
                  overwrite=True)["model"]
  return {"tokenizer_workdir": tok_dir,
          "data.source": f"array_record:{tokens}/{{split}}/tokens-{{split}}-*.array_record",
          "data.text_tokenizer": spm}


STAGES = {"shapes_parti": shapes_parti}


def done_path(workdir: str) -> str:
  return os.path.join(workdir, "prepare", "prepare.json")


def run(name: str, workdir: str, args: dict) -> dict:
  """Runs stage `name` in WORKDIR/prepare unless done; returns its record.

  The record: {"stage", "args", "overrides", "wall_s", "cpu_s", "ran"}, "ran"
  False when an earlier run had done it (the times are that run's).
  """
  marker = done_path(workdir)
  if os.path.exists(marker):
    with open(marker) as f:
      done = json.load(f)
    if done["stage"] == name and done["args"] == args:
      logging.info("prepare %s: done before (%s).", name, marker)
      return {**done, "ran": False}
  directory = os.path.dirname(marker)
  os.makedirs(directory, exist_ok=True)
  wall, cpu = time.perf_counter(), time.process_time()
  overrides = STAGES[name](directory, **args)
  record = {"stage": name, "args": args, "overrides": overrides,
            "wall_s": time.perf_counter() - wall, "cpu_s": time.process_time() - cpu}
  with open(marker, "w") as f:
    json.dump(record, f, indent=2)
  return {**record, "ran": True}


def planned_overrides(name: str, workdir: str) -> dict:
  """The overrides a stage will return, for dry runs (the stage's paths are fixed)."""
  directory = os.path.join(workdir, "prepare")
  if name == "shapes_parti":
    tokens = os.path.join(directory, "tokens")
    return {"tokenizer_workdir": os.path.join(directory, "tokenizer"),
            "data.source": f"array_record:{tokens}/{{split}}/tokens-{{split}}-*.array_record",
            "data.text_tokenizer": os.path.join(directory, "spm.model")}
  raise ValueError(f"prepare={name!r}; valid: {tuple(STAGES)}.")
