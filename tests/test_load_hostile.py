"""Loading files someone else made: checkpoints, Hugging Face directories, tokenizer files.

Each test hands the loader a folder crafted as an attacker would and asserts that loading refuses it
with a MurmurError, without running anything, reading anything outside the folder or allocating what
the files do not hold. Tiny models are built here; nothing is downloaded.
"""

from __future__ import annotations

import json
import pickle
import shlex
import shutil
import struct
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from murmur import hf
from murmur.errors import MurmurError
from murmur.export import run_stage as export_stage
from murmur.model import Transformer
from murmur.settings.model import ModelSettings
from murmur.source import load_model
from murmur.train import checkpoint as ckpt

pytestmark = pytest.mark.usefixtures("one_thread")

METADATA_MODULE = "torch.distributed.checkpoint.metadata"


def _tiny_model() -> Transformer:
    settings = ModelSettings(vocab_size=64, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=64,
                             max_seq_len=32)
    torch.manual_seed(0)
    model = Transformer(settings)
    model.init_weights()
    return model


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> tuple[Path, dict[str, torch.Tensor]]:
    """A run folder with one pretraining checkpoint (model and AdamW state, as training writes it), and the
    weights it holds."""
    run = tmp_path_factory.mktemp("hostile") / "run"
    model = _tiny_model()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(torch.zeros(1, 4, dtype=torch.long)).sum().backward()
    optimizer.step()
    meta = {"model": model.settings.model_dump(mode="json"), "stage": "pretrain", "step": 1, "tokens": 0,
            "tokenizer_dir": None}
    ckpt.Checkpointer(run / "pretrain", keep=1).save(1, model, [optimizer], meta, {})
    return run, {name: tensor.detach().clone() for name, tensor in model.state_dict().items()}


@pytest.fixture(scope="module")
def run_folder(trained) -> Path:
    return trained[0]


@pytest.fixture
def step_dir(run_folder, tmp_path) -> Path:
    """A private copy of the checkpoint's step folder, for a test to tamper with."""
    step = tmp_path / "run" / "pretrain" / "checkpoints" / ckpt.step_name(1)
    shutil.copytree(run_folder, tmp_path / "run")
    return step


@pytest.fixture(scope="module")
def hf_folder(tmp_path_factory) -> Path:
    return hf.save_hf_model(_tiny_model(), tmp_path_factory.mktemp("hostile_hf") / "model")


@pytest.fixture
def hf_dir(hf_folder, tmp_path) -> Path:
    return Path(shutil.copytree(hf_folder, tmp_path / "model"))


def _read_metadata(step: Path):
    return ckpt.SafeFileSystemReader(str(step)).read_metadata()


def _write_metadata(step: Path, metadata) -> None:
    metadata.storage_meta = None  # written by the loader; keeps the pickle to DCP's own records
    (step / ".metadata").write_bytes(pickle.dumps(metadata))


# --- DCP metadata: the unpickler ----------------------------------------------------------------

def _short_unicode(text: str) -> bytes:
    data = text.encode()
    return b"\x8c" + bytes([len(data)]) + data  # SHORT_BINUNICODE


def _call_global_pickle(module: str, name: str, argument: str) -> bytes:
    """Protocol 4: push module and (possibly dotted) name, STACK_GLOBAL, then call it with one argument."""
    return (b"\x80\x04" + _short_unicode(module) + _short_unicode(name) + b"\x93"
            + b"\x8c" + bytes([len(argument.encode())]) + argument.encode() + b"\x85R.")


@pytest.mark.parametrize("dotted", ["os.system", "torch.os.system"])
def test_metadata_reaching_os_system_through_a_dotted_name_never_runs(step_dir, tmp_path, dotted):
    marker = tmp_path / "pwned"
    (step_dir / ".metadata").write_bytes(_call_global_pickle(METADATA_MODULE, dotted,
                                                             f"touch {shlex.quote(str(marker))}"))
    with pytest.raises(MurmurError, match=rf"{METADATA_MODULE}\.{dotted}.*refusing"):
        ckpt.load_for_inference(step_dir.parents[2])
    assert not marker.exists()


@pytest.mark.parametrize("module, name", [
    (METADATA_MODULE, "os"), (METADATA_MODULE, "dataclass"), (METADATA_MODULE, "field"),
    (METADATA_MODULE, "Enum"), ("torch", "load"), ("pathlib", "Path.read_text"), ("builtins", "getattr"),
])
def test_metadata_admits_only_the_records_dcp_writes(step_dir, module, name):
    payload = b"\x80\x04" + _short_unicode(module) + _short_unicode(name) + b"\x93."
    (step_dir / ".metadata").write_bytes(payload)
    with pytest.raises(MurmurError, match="refusing"):
        _read_metadata(step_dir)


def test_a_real_checkpoint_still_loads_with_its_weights(trained):
    model, settings, tokenizer_dir = ckpt.load_for_inference(trained[0])
    assert settings.dim == 32 and tokenizer_dir is None
    loaded = model.state_dict()
    assert loaded.keys() == trained[1].keys()
    for name, tensor in trained[1].items():
        assert torch.equal(loaded[name], tensor), name


def test_metadata_that_is_not_a_dcp_index_is_refused(step_dir):
    (step_dir / ".metadata").write_bytes(pickle.dumps({"storage_data": {}}))
    with pytest.raises(MurmurError, match="not a DCP checkpoint index"):
        ckpt.load_for_inference(step_dir)


# --- DCP data files and pointers: nothing outside the folder ---------------------------------------

def test_data_file_named_outside_the_step_folder_is_refused(step_dir, tmp_path):
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    metadata = _read_metadata(step_dir)
    for info in metadata.storage_data.values():
        shutil.copy(step_dir / info.relative_path, outside / info.relative_path)
        info.relative_path = f"../../../../elsewhere/{info.relative_path}"
    _write_metadata(step_dir, metadata)
    with pytest.raises(MurmurError, match="without '..'"):
        ckpt.load_for_inference(step_dir)


def test_data_file_linking_outside_the_step_folder_is_refused(step_dir, tmp_path):
    data = next(step_dir.glob("*.distcp"))
    outside = tmp_path / "elsewhere.distcp"
    shutil.move(data, outside)
    data.symlink_to(outside)
    with pytest.raises(MurmurError, match="outside"):
        ckpt.load_for_inference(step_dir.parents[2])


def test_latest_pointer_leading_out_of_the_run_is_refused(step_dir, tmp_path):
    outside = tmp_path / "elsewhere"
    shutil.copytree(step_dir, outside / "step_00000001")
    shutil.rmtree(step_dir)
    (step_dir.parent / "latest").write_text(str(outside / "step_00000001") + "\n")
    with pytest.raises(MurmurError, match="latest"):
        ckpt.load_for_inference(step_dir.parents[2])
    (step_dir.parent / "latest").write_text("../../../elsewhere/step_00000001\n")
    with pytest.raises(MurmurError, match="latest"):
        ckpt.load_for_inference(step_dir.parents[2])


def test_stage_folder_linking_out_of_the_run_is_refused(step_dir, tmp_path):
    run = step_dir.parents[2]
    shutil.move(run / "pretrain", tmp_path / "pretrain_elsewhere")
    (run / "pretrain").symlink_to(tmp_path / "pretrain_elsewhere")
    with pytest.raises(MurmurError, match="outside"):
        load_model(run)


def test_run_model_folder_linking_out_of_the_run_is_refused(hf_folder, tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "model").symlink_to(hf_folder)
    with pytest.raises(MurmurError, match="model folder.*outside"):
        load_model(run)


# --- DCP sizes: nothing allocated that the files do not hold ----------------------------------------

def test_settings_disagreeing_with_the_checkpoint_are_refused_before_allocating(step_dir):
    meta = json.loads((step_dir / "murmur.json").read_text())
    meta["model"]["vocab_size"] = 2**42  # 512 TiB of embedding: allocating it first would fail or swap
    (step_dir / "murmur.json").write_text(json.dumps(meta))
    with pytest.raises(MurmurError, match=r"embed_tokens\.weight.*\(4398046511104, 32\).*\(64, 32\)"):
        ckpt.load_for_inference(step_dir)


@pytest.mark.parametrize("layers", [3, 10**9])  # the old code built 10**9 layers (on the meta device) first
def test_layer_count_is_checked_against_the_index_before_building_the_model(step_dir, layers):
    meta = json.loads((step_dir / "murmur.json").read_text())
    meta["model"]["n_layers"] = layers
    (step_dir / "murmur.json").write_text(json.dumps(meta))
    with pytest.raises(MurmurError, match=f"n_layers={layers}, the checkpoint holds 2 layers"):
        ckpt.load_for_inference(step_dir)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(cut=st.integers(0, 10**6), noise=st.binary(max_size=16), keep=st.integers(0, 64))
def test_damaged_metadata_loads_or_says_why(run_folder, tmp_path_factory, cut, noise, keep):
    step = tmp_path_factory.mktemp("damaged") / ckpt.step_name(1)
    shutil.copytree(run_folder / "pretrain" / "checkpoints" / ckpt.step_name(1), step)
    original = (step / ".metadata").read_bytes()
    cut %= len(original)
    (step / ".metadata").write_bytes(original[:cut] + noise + original[cut + len(noise):][:keep])
    try:
        ckpt.load_for_inference(step)
    except MurmurError:
        pass  # any other exception (or running anything) fails the test


def test_index_claiming_more_than_its_files_hold_is_refused_before_allocating(step_dir):
    meta = json.loads((step_dir / "murmur.json").read_text())
    meta["model"]["vocab_size"] = 2**42
    (step_dir / "murmur.json").write_text(json.dumps(meta))
    metadata = _read_metadata(step_dir)
    for fqn in ("model.embed_tokens.weight", "model.lm_head.weight"):
        entry = metadata.state_dict_metadata[fqn]
        entry.size = torch.Size([2**42, 32])
        entry.chunks[0].sizes = torch.Size([2**42, 32])
    _write_metadata(step_dir, metadata)
    with pytest.raises(MurmurError, match="bytes"):
        ckpt.load_for_inference(step_dir)


# --- Hugging Face directories --------------------------------------------------------------------

def _safetensors(header: bytes, data: bytes = b"", declared: int | None = None) -> bytes:
    return struct.pack("<Q", len(header) if declared is None else declared) + header + data


def _header(**tensors) -> bytes:
    return json.dumps(tensors).encode()


HOSTILE_SAFETENSORS = {
    "empty": b"",
    "short": b"\x01\x02",
    "header size beyond the file": _safetensors(b"{}", declared=2**62),
    "header size over the library's cap": _safetensors(b"{}", b" " * 64, declared=2**27),
    "header not JSON": _safetensors(b"{not json"),
    "header a list": _safetensors(b"[]"),
    "offsets beyond the file": _safetensors(_header(w={"dtype": "F32", "shape": [4], "data_offsets": [0, 2**40]})),
    "offsets reversed": _safetensors(_header(w={"dtype": "F32", "shape": [0], "data_offsets": [16, 0]}), b"\0" * 16),
    "offsets disagreeing with the shape": _safetensors(
        _header(w={"dtype": "F32", "shape": [2**31, 2**31], "data_offsets": [0, 16]}), b"\0" * 16),
    "shape overflowing": _safetensors(
        _header(w={"dtype": "F32", "shape": [2**63, 2**63], "data_offsets": [0, 16]}), b"\0" * 16),
    "negative shape": _safetensors(_header(w={"dtype": "F32", "shape": [-4], "data_offsets": [0, 16]}), b"\0" * 16),
    "unknown dtype": _safetensors(_header(w={"dtype": "Q99", "shape": [4], "data_offsets": [0, 16]}), b"\0" * 16),
    "metadata not strings": _safetensors(json.dumps({"__metadata__": {"format": [1]}}).encode()),
    "overlapping tensors": _safetensors(_header(a={"dtype": "F32", "shape": [4], "data_offsets": [0, 16]},
                                                b={"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}),
                                        b"\0" * 16),
}


@pytest.mark.parametrize("case", sorted(HOSTILE_SAFETENSORS))
def test_hostile_safetensors_headers_are_refused(hf_dir, case):
    (hf_dir / "model.safetensors").write_bytes(HOSTILE_SAFETENSORS[case])
    with pytest.raises(MurmurError, match="model.safetensors"):
        load_model(hf_dir)


def _shard(hf_dir: Path, tmp_path: Path) -> tuple[Path, dict]:
    """Move the weights to `elsewhere/` and return an index listing every tensor in one shard."""
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    shutil.move(hf_dir / "model.safetensors", outside / "model.safetensors")
    names = list(hf.read_safetensors([outside / "model.safetensors"]))
    return outside / "model.safetensors", {"weight_map": dict.fromkeys(names)}


@pytest.mark.parametrize("name", ["absolute", "../elsewhere/model.safetensors"])
def test_index_naming_a_shard_outside_the_folder_is_refused(hf_dir, tmp_path, name):
    shard, index = _shard(hf_dir, tmp_path)
    index["weight_map"] = dict.fromkeys(index["weight_map"], str(shard) if name == "absolute" else name)
    (hf_dir / hf.INDEX_NAME).write_text(json.dumps(index))
    with pytest.raises(MurmurError, match="relative to its folder"):
        load_model(hf_dir)


def test_shard_linking_outside_the_folder_is_refused(hf_dir, tmp_path):
    shard, index = _shard(hf_dir, tmp_path)
    (hf_dir / "model-00001-of-00001.safetensors").symlink_to(shard)
    index["weight_map"] = dict.fromkeys(index["weight_map"], "model-00001-of-00001.safetensors")
    (hf_dir / hf.INDEX_NAME).write_text(json.dumps(index))
    with pytest.raises(MurmurError, match="outside"):
        load_model(hf_dir)


def test_single_weights_file_linking_outside_the_folder_is_refused(hf_dir, tmp_path):
    shard, _ = _shard(hf_dir, tmp_path)
    (hf_dir / "model.safetensors").symlink_to(shard)
    with pytest.raises(MurmurError, match="outside"):
        load_model(hf_dir)


def test_hub_cache_snapshot_links_into_its_own_blobs_still_load(hf_folder, tmp_path):
    repo = tmp_path / "models--org--tiny"
    snapshot = repo / "snapshots" / "0123abc"
    (repo / "blobs").mkdir(parents=True)
    snapshot.mkdir(parents=True)
    for i, file in enumerate(sorted(hf_folder.iterdir())):
        shutil.copy(file, repo / "blobs" / f"blob{i}")
        (snapshot / file.name).symlink_to(Path("../../blobs") / f"blob{i}")
    assert load_model(snapshot).settings.dim == 32


@pytest.mark.parametrize("weight_map", [["a"], {"w": {"file": "x"}}, {"w": 3}, {"w": "a\0b"}, {"w": ""}, "x"])
def test_malformed_index_is_refused(hf_dir, weight_map):
    (hf_dir / hf.INDEX_NAME).write_text(json.dumps({"weight_map": weight_map}))
    with pytest.raises(MurmurError, match=hf.INDEX_NAME):
        load_model(hf_dir)


@pytest.mark.parametrize("config", ["[]", '"llama"', "3", "null", '["model_type"]'])
def test_config_that_is_not_an_object_is_refused(hf_dir, config):
    (hf_dir / "config.json").write_text(config)
    with pytest.raises(MurmurError, match="config.json.*JSON object"):
        load_model(hf_dir)


@pytest.mark.parametrize("key, value", [
    ("rope_scaling", "linear"), ("rope_scaling", {"rope_type": "llama3"}), ("rope_parameters", []),
    ("rope_scaling", {"rope_type": "linear", "factor": "x"}), ("max_position_embeddings", "x"),
    ("hidden_size", "32"), ("num_key_value_heads", [2]), ("sliding_window", "x"), ("vocab_size", 10**100),
    ("rms_norm_eps", "x"), ("head_dim", True), ("rope_theta", float("inf")),
])
def test_config_values_of_the_wrong_kind_name_the_key(hf_dir, key, value):
    config = json.loads((hf_dir / "config.json").read_text())
    config[key] = value
    if key == "sliding_window":
        config["use_sliding_window"] = True
    (hf_dir / "config.json").write_text(json.dumps(config))
    with pytest.raises(MurmurError, match=key.split("_scaling")[0]):
        load_model(hf_dir)


@pytest.mark.parametrize("layers", [3, 10**9])
def test_layer_count_is_checked_against_the_weights_before_building_the_model(hf_dir, layers):
    config = json.loads((hf_dir / "config.json").read_text())
    config["num_hidden_layers"] = layers
    (hf_dir / "config.json").write_text(json.dumps(config))
    with pytest.raises(MurmurError, match=f"num_hidden_layers={layers}, the weights hold 2 layers"):
        load_model(hf_dir)


def test_config_missing_a_required_key_names_it(hf_dir):
    config = json.loads((hf_dir / "config.json").read_text())
    del config["intermediate_size"]
    (hf_dir / "config.json").write_text(json.dumps(config))
    with pytest.raises(MurmurError, match="config.json: missing intermediate_size"):
        load_model(hf_dir)


JSON_VALUES = st.recursive(st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8),
                           lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner,
                                                                                        max_size=3),
                           max_leaves=6)
CONFIG_KEYS = ("model_type", "hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
               "intermediate_size", "vocab_size", "head_dim", "max_position_embeddings", "rope_theta", "rope_scaling",
               "rope_parameters", "rms_norm_eps", "tie_word_embeddings", "sliding_window", "use_sliding_window",
               "hidden_act", "mlp_bias", "attention_bias", "initializer_range")


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(changes=st.dictionaries(st.sampled_from(CONFIG_KEYS), JSON_VALUES, min_size=1, max_size=4))
def test_fuzzed_config_loads_or_says_why(hf_folder, changes):
    config = json.loads((hf_folder / "config.json").read_text())
    config.update(changes)
    try:
        settings = hf.settings_from_hf_config(config)
        hf.hf_to_murmur_state(hf.read_safetensors([hf_folder / "model.safetensors"]), settings, "fuzzed")
    except MurmurError:
        pass


# --- tokenizer files read by export ----------------------------------------------------------------

@pytest.mark.parametrize("config, tokenizer", [
    ("[]", '{"added_tokens": []}'), ('{"eos_token": "<e>"}', "{not json"), ('{"eos_token": "<e>"}', "[]"),
    ('{"eos_token": "<e>"}', '{"added_tokens": [3, {"content": "<e>"}]}'),
    ('{"eos_token": ["<e>"]}', '{"added_tokens": [{"content": "<e>", "id": 1}]}'),
])
def test_malformed_tokenizer_files_give_a_clear_error(tmp_path, config, tokenizer):
    (tmp_path / "tokenizer_config.json").write_text(config)
    (tmp_path / "tokenizer.json").write_text(tokenizer)
    try:
        ids = hf.special_token_ids(tmp_path)
    except MurmurError as err:
        assert "tokenizer" in str(err)
    else:
        assert ids == {}


def test_export_never_copies_a_tokenizer_file_linking_outside_its_folder(run_folder, tmp_path):
    run = Path(shutil.copytree(run_folder, tmp_path / "run"))
    tokenizer = run / "tokenizer"
    tokenizer.mkdir()
    secret = tmp_path / "id_rsa"
    secret.write_text("PRIVATE KEY")
    (tokenizer / "chat_template.jinja").symlink_to(secret)
    (tokenizer / "tokenizer.json").write_text('{"added_tokens": []}')
    meta_file = run / "pretrain" / "checkpoints" / ckpt.step_name(1) / "murmur.json"
    meta_file.write_text(json.dumps({**json.loads(meta_file.read_text()), "tokenizer_dir": "tokenizer"}))
    with pytest.raises(MurmurError, match="chat_template.jinja.*outside"):
        export_stage(None, run)
    assert not (run / "model").exists()
