"""Which runs may be compared: runs of one protocol.

A protocol is what makes two runs' numbers comparable: the model, the feature model (FID's
feature space and the prompt classifier), and the sampling (samples, sampler steps, guidance,
seed: the same prompts and the same initial noise). The quantization method is what varies
between the runs of one protocol; the batch size and the description change no number.

`protocol_key` is the one place qtui decides this: the engine's `protocol_hash`, which the
engine stores per run as well, so qtui and `engine show` group runs alike.
"""

from __future__ import annotations


SAMPLING_KEYS = ("samples", "steps", "guidance", "seed")


def protocol_fields(config: dict) -> dict:
    """The parts of a run's stored config that define its protocol."""
    sampling = config.get("sampling") or {}
    model = config.get("model") or {}
    feature = config.get("feature_model") or {}
    return {
        "model": model.get("id") if isinstance(model, dict) else model,
        "feature_model": feature.get("id") if isinstance(feature, dict) else feature,
        "sampling": {k: sampling.get(k) for k in SAMPLING_KEYS},
    }


def protocol_key(config: dict) -> str:
    """The engine's protocol hash (engine.protocol, standard library only; stored per run too):
    equal for runs of one protocol, different otherwise. Configs with no protocol information at
    all (old or foreign rows) get the empty key."""
    from engine.protocol import protocol_hash

    fields = protocol_fields(config)
    if fields["model"] is None and not any(v is not None for v in fields["sampling"].values()):
        return ""
    return protocol_hash(config)


def describe_protocol(config: dict) -> str:
    """`n=1000 seed 0 · 20 steps · guidance 1.0 · digits-unet / digits-classifier`."""
    fields = protocol_fields(config)
    s = fields["sampling"]
    parts = []
    if s.get("samples") is not None:
        parts.append(f"n={s['samples']} seed {s.get('seed')}")
    if s.get("steps") is not None:
        parts.append(f"{s['steps']} steps")
    if s.get("guidance") is not None:
        parts.append(f"guidance {s['guidance']}")
    if fields["model"] is not None:
        parts.append(f"{fields['model']} / {fields['feature_model']}")
    return " · ".join(parts)
