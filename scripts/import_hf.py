#!/usr/bin/env python3
"""Imports a HuggingFace SwitchTransformers or T5 model directory as a SwitchT5 checkpoint.

Usage: import_hf.py HF_DIR CKPT [--inputs-length N] [--targets-length N] [--switcht5 BIN]
       (run with build/pyenv/bin/python; scripts/python_env.sh)

Reads HF_DIR/config.json and the weights (model.safetensors, a sharded
model.safetensors.index.json, or pytorch_model.bin, which needs torch) and writes CKPT, a
params-only checkpoint (step 0, optimizer "none", no /optimizer group, layout 1 x 1 x 1) that
`switcht5 train --resume CKPT` / `switcht5 eval --checkpoint CKPT` load. The file is written
as CKPT.tmp and renamed. float16 / bfloat16 weights are widened to float32 exactly.

Names (the inverse of scripts/export_hf.py): HF state_dict keys, except that the experts of a
Switch layer, <p>.mlp.experts.expert_{j}.<w>.weight, are stacked into
<p>.mlp.experts.<w>.weight [E, ...], and T5's <block>.layer.{1|2}.DenseReluDense.* becomes
<block>.layer.{1|2}.mlp.*. encoder/decoder.embed_tokens (aliases of shared) and a tied
lm_head are not stored. The mapping comes from `switcht5 inspect --hf-names --config` run on
the imported config (ParamStore::hf_names, the one place it lives), so the built binary is
needed: --switcht5 BIN, else $SWITCHT5, else build/switcht5, else switcht5 on the PATH.

Config: the model section comes from config.json (SwitchTransformersConfig or T5Config names;
for Switch, the sparse steps HF actually uses: the encoder/decoder_sparse_step keys when
present, else num_layers // num_sparse_*_layers). HF's expert_capacity (a fixed number per
expert per sequence) becomes model.expert_capacity with group_size 0 (one sequence per group):
the same routing. Keys HF has no field for come from config.json["switcht5"] when the
directory was made by export_hf.py, else: capacity factors 1.0 / 2.0 (unused while
expert_capacity > 0), group_size 0, init_scale 0.1, expert_dropout = dropout_rate (HF applies
dropout_rate inside the experts). The data section is a synthetic task of
--inputs-length / --targets-length tokens (default: the exported lengths, else 512 / 114);
point data at real shards with --set when training.
Refused (one-line error, exit 2): other model types, router_bias, Switch activations other
than relu, T5 feed_forward_proj other than relu / gated-gelu, eos_token_id = pad_token_id,
relative_attention_max_distance <= num_buckets / 2, missing, misshapen or unknown tensors.
"""
import argparse
import json
import math
import os
import struct
import sys
import tempfile

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from export_hf import (FORMAT, FORMAT_VERSION, MODEL_DEFAULTS, SWITCHT5_ONLY_KEYS,  # noqa: E402
                       UserError, checksum, find_switcht5, hf_name_table, is_sparse_layer,
                       resolve_model, t5_key)

PROG = "import_hf.py"
# HF keys that name no tensor of ours: aliases of shared.weight, and a bias old T5 checkpoints
# carry that HF ignores as well.
IGNORED_HF_KEYS = {"encoder.embed_tokens.weight", "decoder.embed_tokens.weight",
                   "decoder.block.0.layer.1.EncDecAttention.relative_attention_bias.weight"}


# ---- HF config -> our model section ------------------------------------------------------------

def _hf_sparse_step(hf, stack, layers):
    """The sparse step HF's model uses: the config.json key (PretrainedConfig sets it after
    SwitchTransformersConfig.__init__ derived its own), else the derivation from the count."""
    if f"{stack}_sparse_step" in hf:
        return int(hf[f"{stack}_sparse_step"])
    n = int(hf.get(f"num_sparse_{stack}_layers", 3))
    return layers // n if n > 0 else layers


def model_section(hf, path):
    """Our model section (every key of MODEL_DEFAULTS) from a config.json dict."""
    kind = hf.get("model_type")
    if kind not in ("switch_transformers", "t5"):
        raise UserError(f"{path}: model_type {kind!r} is neither switch_transformers nor t5")
    get = lambda key, default: hf[key] if hf.get(key) is not None else default  # noqa: E731
    m = dict(MODEL_DEFAULTS)
    for key in ("vocab_size", "d_model", "d_ff", "d_kv", "num_heads", "num_layers"):
        if key not in hf:
            raise UserError(f"{path}: no {key}")
        m[key] = hf[key]
    # HF's defaults, where they differ from ours.
    m["dropout_rate"] = get("dropout_rate", 0.1)
    for key in ("relative_attention_num_buckets", "relative_attention_max_distance",
                "layer_norm_epsilon", "pad_token_id", "eos_token_id"):
        m[key] = get(key, m[key])
    m["num_decoder_layers"] = get("num_decoder_layers", m["num_layers"])
    m["tie_word_embeddings"] = bool(get("tie_word_embeddings", True))
    # HF's Switch docs: "usually set to the pad_token_id"; HF's forward fails without one.
    m["decoder_start_token_id"] = get("decoder_start_token_id", m["pad_token_id"])
    extras = (hf.get("switcht5") or {}).get("model", {})
    if kind == "t5":
        proj = get("feed_forward_proj", "relu")
        if proj not in ("relu", "gated-gelu"):
            raise UserError(f"{path}: feed_forward_proj {proj!r} is not supported (relu or gated-gelu)")
        m["feed_forward_proj"] = proj
        m["num_experts"] = int(extras.get("num_experts", 0))
        m["encoder_sparse_step"] = m["decoder_sparse_step"] = 0
        m["expert_capacity"] = 0
    else:
        if get("router_bias", False):
            raise UserError(f"{path}: router_bias is true; SwitchT5 routers have no bias")
        act = get("dense_act_fn", "relu")
        if act != "relu":
            raise UserError(f"{path}: dense_act_fn {act!r} is not supported (Switch layers: relu)")
        m["feed_forward_proj"] = "relu"
        m["num_experts"] = get("num_experts", 8)
        m["encoder_sparse_step"] = _hf_sparse_step(hf, "encoder", m["num_layers"])
        m["decoder_sparse_step"] = _hf_sparse_step(hf, "decoder", m["num_decoder_layers"])
        m["expert_capacity"] = get("expert_capacity", 64)
        for key in ("router_jitter_noise", "router_z_loss_coef", "router_aux_loss_coef"):
            m[key] = get(key, m[key])
        m["expert_dropout"] = m["dropout_rate"]
    for key in SWITCHT5_ONLY_KEYS:
        if key in extras and key != "expert_capacity":
            m[key] = extras[key]
    # Ours is kept only while HF's is still the capacity export_hf.py derived from it.
    if "expert_capacity" in extras and hf.get("expert_capacity") == (hf.get("switcht5") or {}).get("hf_expert_capacity"):
        m["expert_capacity"] = extras["expert_capacity"]
    try:
        m = resolve_model(m)
    except ValueError as e:
        raise UserError(f"{path}: {e}") from None
    if m["eos_token_id"] == m["pad_token_id"]:
        raise UserError(f"{path}: eos_token_id = pad_token_id = {m['pad_token_id']}; SwitchT5 needs them "
                        "apart (padding is masked out of the loss, eos is not)")
    if m["relative_attention_max_distance"] <= m["relative_attention_num_buckets"] // 2:
        raise UserError(f"{path}: relative_attention_max_distance {m['relative_attention_max_distance']} "
                        f"must exceed relative_attention_num_buckets / 2 = {m['relative_attention_num_buckets'] // 2}")
    if m["num_experts"] < 1 and (m["encoder_sparse_step"] > 0 or m["decoder_sparse_step"] > 0):
        raise UserError(f"{path}: num_experts {m['num_experts']} with Switch layers")
    return m


def _yaml_value(v):
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int):
        return repr(v)
    if isinstance(v, float):
        # "1.0e-06", not "1e-06": YAML 1.1 readers (PyYAML) take a float without a dot for a string.
        text = repr(v)
        return text.replace("e", ".0e", 1) if "e" in text and "." not in text else text
    return json.dumps(v)


def config_yaml(m, data, source):
    lines = [f"# SwitchT5 run configuration, imported by scripts/import_hf.py from {source}", "model:"]
    lines += [f"  {k}: {_yaml_value(m[k])}" for k in MODEL_DEFAULTS]
    lines += ["data:", '  source: "synthetic"']
    lines += [f"  {k}: {_yaml_value(v)}" for k, v in data.items()]
    return "\n".join(lines) + "\n"


# ---- weights -----------------------------------------------------------------------------------

_ST_DTYPES = {"F32": np.float32, "F16": np.float16, "F64": np.float64}


def read_safetensors(path):
    """{name: float32 array} of a .safetensors file, read here rather than by the safetensors
    package because numpy has no bfloat16 (bf16 -> f32 is exact: the top 16 bits)."""
    try:
        raw = np.memmap(path, dtype=np.uint8, mode="r")
        (n,) = struct.unpack("<Q", raw[:8].tobytes())
        header = json.loads(raw[8:8 + n].tobytes())
    except (OSError, struct.error, ValueError):
        raise UserError(f"{path}: not a safetensors file") from None
    body = raw[8 + n:]
    out = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        start, stop = info["data_offsets"]
        dtype, shape = info["dtype"], tuple(info["shape"])
        if dtype == "BF16":
            value = (body[start:stop].view("<u2").astype(np.uint32) << 16).view(np.float32)
        elif dtype in _ST_DTYPES:
            value = body[start:stop].view(np.dtype(_ST_DTYPES[dtype]).newbyteorder("<"))
        else:
            raise UserError(f"{path}: tensor {name} has dtype {dtype}, expected a float type")
        out[name] = value.astype(np.float32).reshape(shape)
    return out


def read_hf_weights(hf_dir):
    single = os.path.join(hf_dir, "model.safetensors")
    index = os.path.join(hf_dir, "model.safetensors.index.json")
    torch_bin = os.path.join(hf_dir, "pytorch_model.bin")
    if os.path.isfile(single):
        return read_safetensors(single)
    if os.path.isfile(index):
        with open(index) as fh:
            files = sorted(set(json.load(fh)["weight_map"].values()))
        out = {}
        for name in files:
            out.update(read_safetensors(os.path.join(hf_dir, name)))
        return out
    if os.path.isfile(torch_bin):
        try:
            import torch
        except ImportError:
            raise UserError(f"{torch_bin}: reading pytorch_model.bin needs torch (scripts/python_env.sh)") from None
        state = torch.load(torch_bin, map_location="cpu")
        return {k: v.float().numpy() for k, v in state.items()}
    raise UserError(f"{hf_dir}: no model.safetensors, model.safetensors.index.json or pytorch_model.bin")


def our_params(hf, table, m, t5, where):
    """HF tensors -> {our name: float32 array} by the name table (hf_name_table: experts
    stacked at their offsets); t5: the HF model is a T5ForConditionalGeneration (dense MLPs
    named DenseReluDense)."""
    shapes, names = table
    used = set()

    def take(key):
        if key not in hf:
            raise UserError(f"{where}: tensor {key} is missing")
        used.add(key)
        return hf[key]

    flat = {name: np.zeros(math.prod(shape), dtype=np.float32) for name, shape in shapes.items()}
    for key, (name, offset, shape) in names.items():
        key = t5_key(key) if t5 else key
        if key == "shared.weight" and key not in hf and "encoder.embed_tokens.weight" in hf:
            key = "encoder.embed_tokens.weight"
        value = take(key)
        if tuple(value.shape) != tuple(shape):
            raise UserError(f"{where}: tensor {key} has shape {list(value.shape)}, expected {list(shape)}")
        flat[name][offset:offset + value.size] = np.asarray(value, dtype=np.float32).reshape(-1)
    ignored = IGNORED_HF_KEYS | ({"lm_head.weight"} if m["tie_word_embeddings"] else set())
    unknown = sorted(set(hf) - used - ignored)
    if unknown:
        raise UserError(f"{where}: tensor {unknown[0]} is not a parameter of the model in config.json"
                        f" ({len(unknown)} such tensors)")
    return {name: flat[name].reshape(shape) for name, shape in shapes.items()}


# ---- checkpoint writing ------------------------------------------------------------------------

def write_checkpoint(path, params, config_text, source):
    import h5py

    tmp = path + ".tmp"
    try:
        if os.path.dirname(path):
            os.makedirs(os.path.dirname(path), exist_ok=True)
        with h5py.File(tmp, "w") as f:
            f.attrs["format"] = FORMAT
            f.attrs["format_version"] = np.int64(FORMAT_VERSION)
            f.attrs["step"] = np.int64(0)
            f.attrs["optimizer"] = "none"
            f.attrs["config"] = config_text
            f.attrs["layout"] = "world 1 = data 1 x model 1, experts over groups of 1"
            for key in ("layout_data", "layout_model", "layout_expert", "world_size"):
                f.attrs[key] = np.int64(1)
            f.attrs["layout_zero1"] = np.int64(0)
            f.attrs["source"] = f"scripts/import_hf.py {source}"
            f.attrs["checksum_algorithm"] = (
                "sum mod 2^64 over elements i (row-major index in the logical tensor) of "
                "mix64(mix64(i) + float32 bits of element i); mix64 = splitmix64 finalizer")
            params_group = f.create_group("params")
            for name, value in params.items():
                ds = params_group.create_dataset(name, data=value, dtype=np.float32)
                ds.attrs["checksum"] = np.uint64(checksum(value))
        os.replace(tmp, path)
    except OSError as e:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise UserError(f"{path}: cannot write: {e.strerror or e}") from None


def name_table(switcht5, config_text):
    """hf_name_table for the model of `config_text` (written to a temporary file for
    `switcht5 inspect --hf-names --config`)."""
    fd, path = tempfile.mkstemp(prefix="import_hf-", suffix=".yaml")
    try:
        with os.fdopen(fd, "w") as fh:
            fh.write(config_text)
        return hf_name_table(switcht5, ["--config", path])
    finally:
        os.remove(path)


def import_hf(hf_dir, ckpt, inputs_length=None, targets_length=None, switcht5=None, force=False):
    # Before any work: an import never replaces a file (a training checkpoint) unless asked to.
    if not force and os.path.lexists(ckpt):
        raise UserError(f"{ckpt}: the file exists; pass --force to overwrite it")
    config_path = os.path.join(hf_dir, "config.json")
    try:
        with open(config_path) as fh:
            hf_config = json.load(fh)
    except OSError as e:
        raise UserError(f"{config_path}: cannot read: {e.strerror or e}") from None
    except ValueError as e:
        raise UserError(f"{config_path}: not JSON ({e})") from None
    m = model_section(hf_config, config_path)
    lengths = (hf_config.get("switcht5") or {}).get("data", {})
    data = {"inputs_length": int(inputs_length or lengths.get("inputs_length", 512)),
            "targets_length": int(targets_length or lengths.get("targets_length", 114))}
    config_text = config_yaml(m, data, hf_dir)
    table = name_table(find_switcht5(switcht5), config_text)
    params = our_params(read_hf_weights(hf_dir), table, m, hf_config["model_type"] == "t5", hf_dir)
    write_checkpoint(ckpt, params, config_text, hf_dir)
    return m


def main(argv=None):
    parser = argparse.ArgumentParser(
        prog=PROG, description="Import a HuggingFace SwitchTransformers / T5 model directory "
        "as a params-only SwitchT5 checkpoint.")
    parser.add_argument("hf_dir", metavar="HF_DIR", help="directory with config.json and model.safetensors")
    parser.add_argument("ckpt", metavar="CKPT", help="checkpoint file to write (.h5)")
    parser.add_argument("--force", action="store_true", help="overwrite CKPT if it exists")
    parser.add_argument("--inputs-length", type=int, metavar="N",
                        help="data.inputs_length of the stored config (default: exported value, else 512)")
    parser.add_argument("--targets-length", type=int, metavar="N",
                        help="data.targets_length of the stored config (default: exported value, else 114)")
    parser.add_argument("--switcht5", metavar="BIN", help="the switcht5 binary, for the parameter "
                        "name table (default: $SWITCHT5, else build/switcht5, else PATH)")
    args = parser.parse_args(argv)
    for flag, value in (("--inputs-length", args.inputs_length), ("--targets-length", args.targets_length)):
        if value is not None and value < 2:
            parser.error(f"{flag}: got {value}, expected an integer >= 2")
    try:
        m = import_hf(args.hf_dir, args.ckpt, args.inputs_length, args.targets_length, args.switcht5,
                      args.force)
    except UserError as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 2
    sparse = sum(is_sparse_layer(m["encoder_sparse_step"], i) for i in range(m["num_layers"])) + sum(
        is_sparse_layer(m["decoder_sparse_step"], i) for i in range(m["num_decoder_layers"]))
    print(f"{PROG}: wrote {args.ckpt} ({sparse} Switch layers of {m['num_experts']} experts)"
          if sparse else f"{PROG}: wrote {args.ckpt} (dense)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
