"""The encode binary: tokens on disk equal the tokenizer's codes; stage 2 reads them."""
import glob
import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from vimjax.configs import vim as vim_config
from vimjax import config_lib
from vimjax import encoding
from vimjax.data import pipeline
from vimjax.data import sources
from vimjax.tasks import tokenizer

pytestmark = pytest.mark.slow

CODEBOOK, SIZE, GRID = 64, 16, 4
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def tokenizer_workdir(tiny_tokenizer):
  """The session's tiny tokenizer (conftest: 16 px, 4x4 grid, 64 codes), trained 2 steps."""
  return tiny_tokenizer


@pytest.fixture(scope="module")
def encoded(tokenizer_workdir, tmp_path_factory):
  output = str(tmp_path_factory.mktemp("tokens"))
  config = encoding.load_tokenizer_config(tokenizer_workdir)
  # 12 examples in batches of 8: the padded last batch's 4 mask=0 rows are dropped.
  result = encoding.run(config, tokenizer_workdir, output, num_examples=12, examples_per_shard=5)
  return output, result


def test_tokens_equal_the_tokenizers_codes(tokenizer_workdir, encoded):
  output, result = encoded
  assert result == {"output": output, "num_examples": {"train": 12, "eval": 12},
                    "skipped": {"train": 0, "eval": 0}, "shards": 6}
  names = sorted(os.path.basename(p) for p in glob.glob(f"{output}/tokens-*.array_record"))
  assert names == [f"tokens-{s}-{i:05d}-of-00003.array_record"
                   for s in ("eval", "train") for i in range(3)]
  metadata = json.load(open(os.path.join(output, "metadata.json")))
  assert (metadata["grid_size"], metadata["codebook_size"]) == (GRID, CODEBOOK)
  assert metadata["tokenizer_step"] == 2

  # Reference: the generator restored independently (host numpy), unsharded, on the
  # source's images with the eval pipeline's preprocessing.
  config = encoding.load_tokenizer_config(tokenizer_workdir)
  model = tokenizer.build_model(config)
  params, _ = tokenizer.load_pretrained(tokenizer_workdir)
  for split in ("train", "eval"):
    records = sources.make_source(f"array_record:{output}/tokens-{split}-*.array_record", split,
                                  image_size=SIZE)
    source = sources.make_source("shapes", split, image_size=SIZE, num_examples=12)
    assert len(records) == 12
    images = np.stack([pipeline.resize_and_crop(pipeline.decode_image(source[i]["image"]),
                                                SIZE, None) for i in range(12)])
    codes = np.asarray(jax.jit(lambda p, x: model.apply(
        {"params": p}, x, train=False, method="encode")[1]["codes"])(params, images))
    for i in range(12):
      record = records[i]
      assert set(record) == {"tokens", "label", "caption"}
      assert record["tokens"].dtype == np.int32 and record["tokens"].shape == (GRID * GRID,)
      assert 0 <= record["tokens"].min() and record["tokens"].max() < CODEBOOK
      np.testing.assert_array_equal(record["tokens"], codes[i])
      assert record["label"] == source[i]["label"]
      assert record["caption"] == source[i]["caption"]


def test_stage2_config_reads_the_shards(encoded):
  output, _ = encoded
  config = vim_config.get_config("tiny")
  config.unlock()
  config.data.source = f"array_record:{output}/tokens-{{split}}-*.array_record"
  config.model.update(grid_size=GRID, codebook_size=CODEBOOK)
  config_lib.validate(config, 8)
  batch = next(pipeline.create_iterator(config.data, split="train", global_batch_size=8, seed=0,
                                        train=True))
  assert batch["tokens"].shape == (8, GRID * GRID) and batch["tokens"].dtype == np.int32
  config.model.codebook_size = 512
  with pytest.raises(ValueError, match="model.codebook_size=512 does not match .*=64"):
    config_lib.validate(config, 8)


def test_refuses_existing_output_and_the_binary_overwrites(tokenizer_workdir, encoded, tmp_path):
  output, _ = encoded
  config = encoding.load_tokenizer_config(tokenizer_workdir)
  with pytest.raises(ValueError, match=r"already holds 6 token shards; pass --overwrite"):
    encoding.run(config, tokenizer_workdir, output, num_examples=4)
  with pytest.raises(ValueError, match="has no config.json"):
    encoding.load_tokenizer_config(str(tmp_path))

  out = subprocess.run(
      [sys.executable, "-m", "vimjax.encode", f"--tokenizer_workdir={tokenizer_workdir}",
       f"--output={output}", "--overwrite", "--splits=eval", "--num_examples=4",
       "--config.global_batch_size=16"],
      cwd=REPO, capture_output=True, text=True, timeout=300, check=False)
  assert out.returncode == 0, out.stderr[-3000:]
  result = json.loads(out.stdout.strip().splitlines()[-1])
  assert result == {"output": output, "num_examples": {"eval": 4}, "skipped": {"eval": 0},
                    "shards": 1}
  assert [os.path.basename(p) for p in glob.glob(f"{output}/tokens-*.array_record")] == [
      "tokens-eval-00000-of-00001.array_record"]
