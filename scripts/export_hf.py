#!/usr/bin/env python3
"""Exports a SwitchT5 checkpoint to a HuggingFace transformers model directory.

Usage: export_hf.py CKPT OUT_DIR [--switcht5 BIN]
       (run with build/pyenv/bin/python; scripts/python_env.sh)

Writes OUT_DIR/config.json and OUT_DIR/model.safetensors (float32) for
  SwitchTransformersForConditionalGeneration   when a stack has Switch layers, or
  T5ForConditionalGeneration                   for a dense model (num_experts = 0 or both
                                               sparse steps 0),
so that `<class>.from_pretrained(OUT_DIR)` loads it. Needs h5py, numpy, safetensors and
pyyaml, not torch. Every /params dataset's checksum is verified first; /optimizer is ignored.

Parameter names: the checkpoint's /params/<name> are HF state_dict keys with one exception,
stacked experts, which are split here:
  <p>.mlp.experts.wi.weight [E, d_ff, d_model]  ->  <p>.mlp.experts.expert_{j}.wi.weight
  <p>.mlp.experts.wo.weight [E, d_model, d_ff]  ->  <p>.mlp.experts.expert_{j}.wo.weight
The mapping is not written out here: it is read from `switcht5 inspect --hf-names CKPT`
(ParamStore::hf_names, the one place it lives), so the built binary is needed: --switcht5 BIN,
else $SWITCHT5, else build/switcht5 beside this script's directory, else switcht5 on the PATH.
For T5ForConditionalGeneration the dense MLP is <block>.layer.{1|2}.DenseReluDense.{wi, wi_0,
wi_1, wo}.weight instead of our (and HF Switch's) <block>.layer.{1|2}.mlp.*. Only shared.weight
is written for the embedding (HF ties encoder/decoder.embed_tokens to it) and lm_head.weight
only when the embeddings are untied.

What HF cannot express, and what is refused (one-line error, exit 2):
  * gated-gelu Switch models: HF Switch experts and dense layers are not gated (wi, wo only).
  * Sparse layout: HF derives encoder_sparse_step = num_layers // num_sparse_encoder_layers
    (and 0 sparse layers still makes block 1 sparse), so a step whose set of Switch blocks no
    count n reproduces (e.g. step 5 with 12 layers, or one dense stack in a Switch model) is
    refused. Block i is sparse iff step > 0 and (step == 1 or i % step == 1) in both codes.
Behaviour differences the export cannot remove (the logits agree when no token is dropped):
  * HF routes each sequence as one group; model.group_size > 0 (groups of that many tokens)
    is exported all the same and only changes which tokens overflow.
  * HF expert_capacity is one fixed number for both stacks, per sequence. We write
    model.expert_capacity when it is > 0, else our evaluation capacity for a group of one
    sequence of the longer stack: ceil(eval_capacity_factor * max(data.inputs_length,
    data.targets_length) / num_experts), at least 1. Sequences longer than that length, or
    group_size > 0, route differently.
  * A token past capacity: ours outputs 0 from the Switch layer (the residual carries it);
    HF keeps its normalised input scaled by its router probability (h + p * rmsnorm(h)).
  * HF's model(...) defaults to output_router_logits=True, which adds its router z-loss and
    load-balancing loss (computed over all Switch layers' tokens at once, with dropped tokens
    counted as expert 0, and skipped for a stack with sparse step 1) to `loss`; compare the
    cross-entropy with output_router_logits=False.
  * Training in HF: one dropout_rate applies inside the experts too (our model.expert_dropout
    is separate), and router jitter, multiplied in place into the float32 router input,
    reaches the experts' input as well (ours jitters the router's copy only).
Our keys that HF has no field for (expert_capacity as configured, capacity factors,
group_size, init_scale, expert_dropout, data lengths) go under the key "switcht5" of
config.json; HF keeps unknown keys as plain config attributes, and import_hf.py reads them
back.
"""
import argparse
import json
import math
import os
import shutil
import subprocess
import sys

import numpy as np

PROG = "export_hf.py"
FORMAT = "switcht5-checkpoint"
FORMAT_VERSION = 1

# ModelConfig defaults (src/config/config.h), for keys a config might leave out.
MODEL_DEFAULTS = {
    "vocab_size": 32128, "d_model": 768, "d_ff": 2048, "d_kv": 64, "num_heads": 12,
    "num_layers": 12, "num_decoder_layers": -1, "num_experts": 8, "expert_capacity": 0,
    "router_jitter_noise": 0.01, "router_z_loss_coef": 0.001, "router_aux_loss_coef": 0.01,
    "encoder_sparse_step": 2, "decoder_sparse_step": 2, "relative_attention_num_buckets": 32,
    "relative_attention_max_distance": 128, "dropout_rate": 0.1, "feed_forward_proj": "relu",
    "tie_word_embeddings": True, "layer_norm_epsilon": 1e-6, "pad_token_id": 0, "eos_token_id": 1,
    "decoder_start_token_id": 0, "capacity_factor": 1.0, "eval_capacity_factor": 2.0,
    "group_size": 0, "init_scale": 0.1, "expert_dropout": 0.1,
}
DATA_DEFAULTS = {"inputs_length": 512, "targets_length": 114}
# Model keys HF has no field for: kept under config.json["switcht5"]["model"].
SWITCHT5_ONLY_KEYS = ("expert_capacity", "capacity_factor", "eval_capacity_factor", "group_size",
                      "init_scale", "expert_dropout")


class UserError(Exception):
    """A one-line message, "<file>: <what>"."""


# ---- checksum (src/checkpoint/h5_file.h) --------------------------------------------------------
# checksum = sum over elements i (row-major index) of mix64(mix64(i) + bits_i)  (mod 2^64),
# bits_i = the float32 bit pattern, mix64 = splitmix64 finalizer. uint64 numpy arithmetic wraps.
_GAMMA = np.uint64(0x9E3779B97F4A7C15)
_M1 = np.uint64(0xBF58476D1CE4E5B9)
_M2 = np.uint64(0x94D049BB133111EB)
_CHUNK = 1 << 22  # elements per vectorised step (about 100 MB of temporaries)


def mix64(z):
    z = z + _GAMMA
    z = (z ^ (z >> np.uint64(30))) * _M1
    z = (z ^ (z >> np.uint64(27))) * _M2
    return z ^ (z >> np.uint64(31))


def checksum(array):
    """The checkpoint checksum of a float32 tensor, as a Python int in [0, 2^64)."""
    bits = np.ascontiguousarray(array, dtype=np.float32).reshape(-1).view(np.uint32)
    total = 0
    with np.errstate(over="ignore"):
        for start in range(0, bits.size, _CHUNK):
            stop = min(start + _CHUNK, bits.size)
            i = np.arange(start, stop, dtype=np.uint64)
            h = mix64(mix64(i) + bits[start:stop].astype(np.uint64))
            total = (total + int(h.sum(dtype=np.uint64))) & 0xFFFFFFFFFFFFFFFF
    return total


# ---- model structure ---------------------------------------------------------------------------

def is_sparse_layer(step, i):
    """HF's and our rule for block i of a stack with sparse step `step` (0: dense stack)."""
    return step > 0 and (step == 1 or i % step == 1)


def resolve_model(model):
    """The model section with defaults filled in (num_decoder_layers -1 -> num_layers), each
    value of its default's type; ValueError names a key whose value is not."""
    m = dict(MODEL_DEFAULTS)
    for key, value in (model or {}).items():
        default = MODEL_DEFAULTS.get(key)
        try:
            if isinstance(default, bool):
                if not isinstance(value, bool):
                    raise ValueError
            elif isinstance(default, int):
                if isinstance(value, bool) or int(value) != value:
                    raise ValueError
                value = int(value)
            elif isinstance(default, float):
                value = float(value)  # PyYAML reads "1e-06" (no dot) as a string
            elif isinstance(default, str):
                value = str(value)
        except (TypeError, ValueError):
            raise ValueError(f"model.{key}: {value!r} is not a {type(default).__name__}") from None
        m[key] = value
    if m["num_decoder_layers"] is None or m["num_decoder_layers"] < 0:
        m["num_decoder_layers"] = m["num_layers"]
    return m


def is_dense(m):
    return m["num_experts"] == 0 or (m["encoder_sparse_step"] == 0 and m["decoder_sparse_step"] == 0)


def gated(m):
    return m["feed_forward_proj"] == "gated-gelu"


# ---- the name mapping (switcht5 inspect --hf-names) --------------------------------------------

def find_switcht5(explicit=None):
    """The switcht5 binary: `explicit` (--switcht5), else $SWITCHT5, else build/switcht5 of
    this checkout, else switcht5 on the PATH; UserError when there is none."""
    for what, candidate in (("--switcht5", explicit), ("SWITCHT5=", os.environ.get("SWITCHT5"))):
        if candidate:
            if not (os.path.isfile(candidate) and os.access(candidate, os.X_OK)):
                raise UserError(f"{what}{'' if what.endswith('=') else ' '}{candidate}: not an "
                                "executable file")
            return candidate
    built = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "build", "switcht5")
    if os.path.isfile(built) and os.access(built, os.X_OK):
        return built
    on_path = shutil.which("switcht5")
    if on_path:
        return on_path
    raise UserError(f"{built}: no switcht5 binary there or on the PATH (build it: cmake --build "
                    "build; or pass --switcht5 BIN or set SWITCHT5)")


def hf_name_table(switcht5, args):
    """`switcht5 inspect --hf-names ARGS` (ARGS: a checkpoint, or --config FILE): the model's
    parameters and their HF names, as (params {our name: shape}, names {HF key: (our name,
    offset of the HF tensor's first element within ours, HF shape)}). Keys are HF
    SwitchTransformers names (t5_key() gives T5's)."""
    cmd = [switcht5, "inspect", "--hf-names", *args]
    try:
        p = subprocess.run(cmd, capture_output=True, text=True)
    except OSError as e:
        raise UserError(f"{switcht5}: cannot run: {e.strerror or e}") from None
    if p.returncode != 0:
        lines = p.stderr.strip().splitlines() or [f"exit code {p.returncode}"]
        raise UserError(lines[0].removeprefix("switcht5: error: "))
    try:
        table = json.loads(p.stdout)
        params = {name: tuple(shape) for name, shape in table["params"].items()}
        names = {key: (e["name"], int(e["offset"]), tuple(e["shape"]))
                 for key, e in table["hf_names"].items()}
    except (ValueError, KeyError, TypeError) as e:
        raise UserError(f"{' '.join(cmd)}: unexpected output ({type(e).__name__}: {e})") from None
    return params, names


def t5_key(key):
    """HF T5ForConditionalGeneration's name for a SwitchTransformers key of a dense model: T5
    calls the dense MLP <block>.layer.{1|2}.DenseReluDense where SwitchTransformers (and we)
    say <block>.layer.{1|2}.mlp."""
    return key.replace(".mlp.", ".DenseReluDense.")


def hf_sparse_count(step, layers):
    """The n of num_sparse_*_layers for which HF's derived step (layers // n, or layers when
    n = 0) makes the same blocks sparse as `step`, preferring n = the number of sparse blocks;
    None if there is none."""
    want = [is_sparse_layer(step, i) for i in range(layers)]
    candidates = [sum(want)] + [n for n in range(0, layers + 1) if n != sum(want)]
    for n in candidates:
        derived = layers // n if n > 0 else layers
        if [is_sparse_layer(derived, i) for i in range(layers)] == want:
            return n, derived
    return None


def hf_expert_capacity(m, data):
    if m["expert_capacity"] > 0:
        return m["expert_capacity"]
    tokens = max(data["inputs_length"], data["targets_length"])
    # As capacity() in src/config/config.cpp; the 1e-9 absorbs floating-point noise.
    return max(1, int(math.ceil(m["eval_capacity_factor"] * tokens / m["num_experts"] - 1e-9)))


def hf_config(m, data, step, path):
    """config.json for the model (dense -> T5, else Switch); UserError if HF can't express it."""
    extras = {"format_version": FORMAT_VERSION, "step": step,
              "model": {k: m[k] for k in SWITCHT5_ONLY_KEYS},
              "data": {k: data[k] for k in ("inputs_length", "targets_length")}}
    common = {
        "vocab_size": m["vocab_size"], "d_model": m["d_model"], "d_kv": m["d_kv"], "d_ff": m["d_ff"],
        "num_layers": m["num_layers"], "num_decoder_layers": m["num_decoder_layers"],
        "num_heads": m["num_heads"],
        "relative_attention_num_buckets": m["relative_attention_num_buckets"],
        "relative_attention_max_distance": m["relative_attention_max_distance"],
        "dropout_rate": m["dropout_rate"], "layer_norm_epsilon": m["layer_norm_epsilon"],
        "initializer_factor": 1.0, "is_encoder_decoder": True, "use_cache": True,
        "pad_token_id": m["pad_token_id"], "eos_token_id": m["eos_token_id"],
        "decoder_start_token_id": m["decoder_start_token_id"],
        "tie_word_embeddings": bool(m["tie_word_embeddings"]), "torch_dtype": "float32",
    }
    if is_dense(m):
        if m["feed_forward_proj"] not in ("relu", "gated-gelu"):
            raise UserError(f"{path}: model.feed_forward_proj {m['feed_forward_proj']!r} is neither relu nor gated-gelu")
        cfg = {"architectures": ["T5ForConditionalGeneration"], "model_type": "t5", **common,
               "feed_forward_proj": m["feed_forward_proj"]}
        extras["model"]["num_experts"] = m["num_experts"]
    else:
        if gated(m):
            raise UserError(f"{path}: model.feed_forward_proj is gated-gelu, but HF "
                            "SwitchTransformers has no gated layers (only wi, wo); export a relu Switch "
                            "model, or a dense (num_experts = 0) gated model as T5")
        sparse = {}
        for stack, layers_key in (("encoder", "num_layers"), ("decoder", "num_decoder_layers")):
            step, layers = m[f"{stack}_sparse_step"], m[layers_key]
            found = hf_sparse_count(step, layers)
            if found is None:
                tried = sorted({layers // n for n in range(1, layers + 1)})
                raise UserError(
                    f"{path}: model.{stack}_sparse_step {step} with {layers} layers cannot be "
                    f"expressed by HF SwitchTransformersConfig, which derives the step as "
                    f"{layers_key} // num_sparse_{stack}_layers (one of {tried}; 0 sparse layers "
                    "still makes block 1 sparse)")
            sparse[f"num_sparse_{stack}_layers"], sparse[f"{stack}_sparse_step"] = found
        cfg = {"architectures": ["SwitchTransformersForConditionalGeneration"],
               "model_type": "switch_transformers", **common, **sparse,
               "num_experts": m["num_experts"], "expert_capacity": hf_expert_capacity(m, data),
               "router_bias": False, "router_jitter_noise": m["router_jitter_noise"],
               "router_dtype": "float32", "router_ignore_padding_tokens": False,
               "router_z_loss_coef": m["router_z_loss_coef"],
               "router_aux_loss_coef": m["router_aux_loss_coef"], "dense_act_fn": "relu",
               "add_router_probs": False}
        extras["hf_expert_capacity"] = cfg["expert_capacity"]
    cfg["switcht5"] = extras
    return cfg


def hf_tensors(params, names, m):
    """Our tensors -> HF state_dict tensors by the name table (experts split), with T5's
    names for a dense model."""
    dense = is_dense(m)
    out = {}
    for key, (name, offset, shape) in names.items():
        value = params[name].reshape(-1)[offset:offset + math.prod(shape)].reshape(shape)
        out[t5_key(key) if dense else key] = value
    return out


# ---- checkpoint reading -------------------------------------------------------------------------

def _text(value):
    return value.decode() if isinstance(value, bytes) else str(value)


def read_checkpoint(path, switcht5):
    """(model section, data section, step, {name: float32 array}, HF name table) of a
    checkpoint, every checksum verified; UserError naming the file and dataset otherwise."""
    import h5py
    import yaml

    if not os.path.isfile(path):
        raise UserError(f"{path}: no such file")
    try:
        f = h5py.File(path, "r")
    except OSError as e:
        raise UserError(f"{path}: not an HDF5 file ({str(e).splitlines()[0]})") from None
    with f:
        if _text(f.attrs.get("format", "")) != FORMAT:
            raise UserError(f"{path}: not a switcht5 checkpoint (no format = \"{FORMAT}\" attribute)")
        version = int(f.attrs.get("format_version", -1))
        if version != FORMAT_VERSION:
            raise UserError(f"{path}: checkpoint format version {version}, this script reads version {FORMAT_VERSION}")
        try:
            config = yaml.safe_load(_text(f.attrs["config"])) or {}
        except (KeyError, yaml.YAMLError) as e:
            raise UserError(f"{path}: attribute config missing or not YAML ({type(e).__name__})") from None
        try:
            m = resolve_model(config.get("model"))
        except ValueError as e:
            raise UserError(f"{path}: attribute config: {e}") from None
        data = dict(DATA_DEFAULTS)
        data.update({k: v for k, v in (config.get("data") or {}).items() if k in DATA_DEFAULTS})
        step = int(f.attrs.get("step", 0))
        if "params" not in f:
            raise UserError(f"{path}: no /params group")
        expected, names = hf_name_table(switcht5, [path])
        present = set(f["params"].keys())
        extra = sorted(present - set(expected))
        if extra:
            raise UserError(f"{path}: dataset /params/{extra[0]} is not a parameter of the model in its config")
        params = {}
        for name, shape in expected.items():
            if name not in present:
                raise UserError(f"{path}: dataset /params/{name} is missing")
            ds = f["params"][name]
            if tuple(ds.shape) != tuple(shape) or ds.dtype != np.float32:
                raise UserError(f"{path}: dataset /params/{name} is {ds.dtype} {list(ds.shape)}, "
                                f"expected float32 {list(shape)}")
            if "checksum" not in ds.attrs:
                raise UserError(f"{path}: dataset /params/{name} has no checksum attribute")
            try:
                value = ds[()]
            except OSError as e:
                raise UserError(f"{path}: dataset /params/{name} cannot be read ({str(e).splitlines()[0]})") from None
            want, got = int(ds.attrs["checksum"]), checksum(value)
            if want != got:
                raise UserError(f"{path}: dataset /params/{name} fails its checksum "
                                f"(stored {want}, computed {got}): the file is corrupt")
            params[name] = value
    return m, data, step, params, names


# ---- main ---------------------------------------------------------------------------------------

def export(ckpt, out_dir, switcht5, force=False):
    from safetensors.numpy import save_file

    # Before any work: an export never replaces a model directory's files unless asked to.
    if not force:
        for name in ("model.safetensors", "config.json"):
            if os.path.lexists(os.path.join(out_dir, name)):
                raise UserError(f"{os.path.join(out_dir, name)}: the file exists; pass --force to "
                                "overwrite it")
    m, data, step, params, names = read_checkpoint(ckpt, switcht5)
    cfg = hf_config(m, data, step, ckpt)
    tensors = {k: np.ascontiguousarray(v) for k, v in hf_tensors(params, names, m).items()}
    # Each file is written beside its final name and renamed: a crash leaves no half file.
    try:
        os.makedirs(out_dir, exist_ok=True)
        weights = os.path.join(out_dir, "model.safetensors")
        save_file(tensors, weights + ".tmp", metadata={"format": "pt"})
        os.replace(weights + ".tmp", weights)
        config = os.path.join(out_dir, "config.json")
        with open(config + ".tmp", "w") as fh:
            json.dump(cfg, fh, indent=2, sort_keys=True)
            fh.write("\n")
        os.replace(config + ".tmp", config)
    except OSError as e:
        raise UserError(f"{out_dir}: cannot write: {e.strerror or e}") from None
    return cfg


def main(argv=None):
    parser = argparse.ArgumentParser(
        prog=PROG, description="Export a SwitchT5 HDF5 checkpoint to a HuggingFace model "
        "directory (config.json + model.safetensors).",
        epilog="Dense checkpoints become T5ForConditionalGeneration, Switch checkpoints "
        "SwitchTransformersForConditionalGeneration. See the docstring for what HF cannot express.")
    parser.add_argument("ckpt", metavar="CKPT", help="checkpoint file (.h5)")
    parser.add_argument("out_dir", metavar="OUT_DIR", help="output directory (created)")
    parser.add_argument("--force", action="store_true",
                        help="overwrite OUT_DIR's config.json and model.safetensors if they exist")
    parser.add_argument("--switcht5", metavar="BIN", help="the switcht5 binary, for the parameter "
                        "name table (default: $SWITCHT5, else build/switcht5, else PATH)")
    args = parser.parse_args(argv)
    try:
        cfg = export(args.ckpt, args.out_dir, find_switcht5(args.switcht5), args.force)
    except UserError as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 2
    print(f"{PROG}: wrote {args.out_dir} ({cfg['architectures'][0]}, step {cfg['switcht5']['step']})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
