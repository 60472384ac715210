"""`lora_type: lycoris`: SimpleTuner's `lycoris_config` JSON, read with SimpleTuner 4.10.1's meaning.

SimpleTuner (helpers/training/trainer.py, the `lycoris` branch) reads the file, takes `multiplier` (default 1),
`linear_dim` (default 4) and `linear_alpha` (default 1), hands `apply_preset` to `LycorisNetwork.apply_preset` and the
remaining keys to `lycoris.create_lycoris` as algorithm arguments. hvtune trains the same adapters with peft's LoKr and
LoHa layers (`hvtune.train.lora.add_lycoris`), reproducing LyCORIS' per-layer rules:

- LoKr: each targeted Linear (out x in) is factorised with `factor` (-1: the most square split) into
  ((out_l, out_k), (in_m, in_n)); `lokr_w1` (out_l x in_m) is split into `w1_a @ w1_b` only with `decompose_both` and
  `linear_dim < max(out_l, in_m) / 2`; `lokr_w2` (out_k x in_n) is split into `w2_a @ w2_b` when
  `linear_dim < max(out_k, in_n) / 2` and not `full_matrix`. The scale is `linear_alpha / linear_dim`, except when
  neither half is split: then it is 1 (LyCORIS ignores alpha there). w1 starts random, w2 at zero.
- LoHa: `(w1_a @ w1_b) * (w2_a @ w2_b)` with rank `linear_dim`, scale `linear_alpha / linear_dim`. Its start values
  are peft's (He-uniform, `w2_b` zero) where LyCORIS draws from normals; both start as a zero change.
- `apply_preset.target_module` (required here): module class names (for HunyuanVideo 1.5: `Attention`,
  `FeedForward`); every Linear inside a module of that class is adapted. `apply_preset.module_algo_map` may set a
  per-class `factor`.

Keys that would change the result and that hvtune does not implement are refused with the key named; `bypass_mode`
(a different way to compute the same output) is accepted and has no effect.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

ALGOS = ("lokr", "loha")
_NO_EFFECT = {"bypass_mode"}  # same result, computed another way
_ALGO_KEYS = {
    "lokr": {"factor", "full_matrix", "decompose_both", "rank_dropout", "module_dropout"},
    "loha": {"rank_dropout", "module_dropout"},
}


@dataclass(frozen=True)
class LycorisSpec:
    algo: str
    dim: int = 4
    alpha: float = 1.0
    factor: int = -1
    full_matrix: bool = False
    decompose_both: bool = False
    rank_dropout: float = 0.0
    module_dropout: float = 0.0
    target_classes: tuple[str, ...] = ()
    class_factors: dict[str, int] = field(default_factory=dict)

    def factor_for(self, class_name: str) -> int:
        return self.class_factors.get(class_name, self.factor)

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> LycorisSpec:
        data = json.loads(text)
        data["target_classes"] = tuple(data["target_classes"])
        return cls(**data)


def read_lycoris_config(path: str | Path) -> LycorisSpec:
    """The spec in `path`; ValueError with one line naming the key for anything hvtune cannot train as asked."""
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except OSError as e:
        raise ValueError(f"cannot read {path}: {e.strerror}") from e
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: malformed JSON at line {e.lineno}, column {e.colno}: {e.msg}") from e
    if not isinstance(data, dict):
        raise ValueError(f"{path}: must be a JSON object")
    data = dict(data)
    algo = data.pop("algo", None)
    if algo not in ALGOS:
        raise ValueError(f"{path}: algo {algo!r} is not supported; hvtune trains LyCORIS algo lokr or loha")
    if float(data.pop("multiplier", 1)) != 1:
        raise ValueError(f"{path}: multiplier must be 1 (SimpleTuner trains at 1; scale at inference instead)")
    kwargs: dict = {"algo": algo}
    if "linear_dim" in data:
        kwargs["dim"] = int(data.pop("linear_dim"))
    if "linear_alpha" in data:
        kwargs["alpha"] = float(data.pop("linear_alpha"))
    preset = data.pop("apply_preset", None) or {}
    for key in list(data):
        if key in _NO_EFFECT:
            data.pop(key)
        elif key in _ALGO_KEYS[algo]:
            kwargs[key] = type(getattr(LycorisSpec, key, 0))(data.pop(key)) if key != "factor" else int(data.pop(key))
    if data:
        raise ValueError(f"{path}: {', '.join(sorted(data))}: not supported by hvtune for algo {algo}; remove it")
    if not isinstance(preset, dict):
        raise ValueError(f"{path}: apply_preset must be an object with target_module (class names)")
    unknown = set(preset) - {"target_module", "module_algo_map"}
    if unknown:
        raise ValueError(f"{path}: apply_preset.{', '.join(sorted(unknown))}: not supported; use target_module")
    targets = preset.get("target_module")
    if not (isinstance(targets, list) and targets and all(isinstance(t, str) for t in targets)):
        # LyCORIS' own default adapts every Linear, embedders included (no ComfyUI name): say what to adapt
        raise ValueError(
            f'{path}: apply_preset.target_module must list module class names, e.g. ["Attention", "FeedForward"]'
        )
    kwargs["target_classes"] = tuple(targets)
    factors = {}
    for name, settings in (preset.get("module_algo_map") or {}).items():
        extra = set(settings) - {"factor"} if isinstance(settings, dict) else {"(not an object)"}
        if extra:
            raise ValueError(
                f"{path}: apply_preset.module_algo_map.{name}: only factor is supported, not {sorted(extra)}"
            )
        if algo == "lokr" and "factor" in settings:
            factors[name] = int(settings["factor"])
    kwargs["class_factors"] = factors
    spec = LycorisSpec(**kwargs)
    if spec.dim < 1:
        raise ValueError(f"{path}: linear_dim must be >= 1")
    return spec
