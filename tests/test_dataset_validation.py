"""i2v validation from the dataset (validation_using_datasets, eval_dataset_id, num_eval_images): besides the one
validation image, videos conditioned on training samples' own cached first frames and captions."""

from __future__ import annotations

import av
import numpy as np
import pytest

from hvtune.config.settings import load_config
from hvtune.errors import ConfigError
from hvtune.trainer import train


def _first_frame(path) -> np.ndarray:
    with av.open(str(path)) as container:
        return next(container.decode(video=0)).to_ndarray(format="rgb24")


def test_refused_for_t2v_and_for_an_unknown_dataset_id(demo_project):
    with pytest.raises(ConfigError) as e:
        load_config(demo_project, env={}, argv=["--validation_using_datasets=true", "--eval_dataset_id=nope"])
    text = str(e.value)
    assert "validation_using_datasets" in text and "i2v" in text
    assert "eval_dataset_id" in text and "synthetic-clips" in text  # names the ids that exist


@pytest.mark.slow
def test_i2v_validates_on_dataset_samples_as_well_as_the_validation_image(demo_project_i2v, tmp_path):
    out = tmp_path / "run"
    argv = [f"--output_dir={out}", "--max_train_steps=1", "--validation_num_inference_steps=2",
            "--validation_using_datasets=true", "--eval_dataset_id=synthetic-clips", "--num_eval_images=2"]  # fmt: skip
    train(load_config(demo_project_i2v, env={}, argv=argv))
    step = out / "validation" / "step_000001"
    names = sorted(p.name for p in step.iterdir())
    assert names == ["validation_0.mp4", "validation_synthetic-clips_0.mp4", "validation_synthetic-clips_1.mp4"]
    a, b = (_first_frame(step / f"validation_synthetic-clips_{i}.mp4") for i in (0, 1))
    assert np.abs(a.astype(int) - b.astype(int)).mean() > 1  # each is conditioned on its own sample
