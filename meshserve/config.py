"""User-facing configuration: the LLM(...) keywords and the serve YAML, as pydantic models.

Every model forbids unknown keys, so a misspelt option is an error naming the key and listing the
accepted ones instead of being silently ignored. Names follow TensorRT-LLM's LLM API.
"""
from __future__ import annotations

from typing import Any, Literal, Optional, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from meshserve.errors import nearest


def _wants_int(annotation) -> bool:
    """Whether a field takes numbers and not booleans (int, float, Optional of them)."""
    args = getattr(annotation, "__args__", (annotation,))
    return (int in args or float in args) and bool not in args


def _wants_int_list(annotation) -> bool:
    """Whether a field takes a list of integers (list[int], Optional[list[int]])."""
    for a in getattr(annotation, "__args__", (annotation,)):
        if getattr(a, "__origin__", None) is list and getattr(a, "__args__", ()) == (int,):
            return True
    return False


class StrictModel(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True, protected_namespaces=())

    @field_validator("*", mode="before")
    @classmethod
    def _no_bool_for_int(cls, value, info):
        # pydantic takes True as 1 for an int field: moe_expert_parallel_size=True would run as 1
        field = cls.model_fields.get(info.field_name)
        if field is not None:
            if isinstance(value, bool) and _wants_int(field.annotation):
                raise ValueError("expected a number, got a boolean")
            if isinstance(value, (list, tuple)) and any(isinstance(v, bool) for v in value) \
                    and _wants_int_list(field.annotation):
                raise ValueError("expected integers, got a boolean among them")
        return value


class KvCacheConfig(StrictModel):
    tokens_per_block: int = Field(32, ge=1, le=1024)
    max_tokens: Optional[int] = Field(None, ge=1)
    free_gpu_memory_fraction: float = Field(0.9, gt=0.0, le=1.0)
    enable_block_reuse: bool = True
    cpu_kv_cache_gb: float = Field(2.0, gt=0.0, description="KV pool size on CPU when max_tokens is unset")
    dtype: str = Field("auto", description=(
        "auto: the KV cache in the model's dtype; fp8: float8_e4m3fn with a scale of 1 (values beyond "
        "+-448 saturate), half the bytes of bf16 per token, so twice the tokens fit (docs/fp8.md)"))

    @field_validator("dtype")
    @classmethod
    def _kv_dtype(cls, v: str) -> str:
        v2 = v.strip().lower()
        if v2 in ("fp8", "fp8_e4m3", "float8_e4m3fn"):
            return "fp8"
        if v2 == "auto":
            return "auto"
        raise ValueError(f"kv_cache_config.dtype={v!r} is not supported; accepted: auto, fp8")


class CudaGraphConfig(StrictModel):
    enable: bool = True
    batch_sizes: Optional[list[int]] = None
    max_batch_size: int = Field(512, ge=1, description=(
        "decode graphs are captured up to min(this, the engine's max_batch_size) sequences (vLLM's "
        "default capture limit); larger decode batches run eagerly"))
    enable_padding: bool = Field(True, description=(
        "pad a decode batch up to the next captured batch size (false: only batches of exactly a "
        "captured size replay a graph, and steps with prompt tokens run eagerly)"))
    prefill_max_tokens: int = Field(2048, ge=0, description=(
        "steps with prompt tokens (mixed prefill/decode) of up to this many tokens replay CUDA graphs "
        "captured per token-count bucket; 0 runs them eagerly"))
    prefill_token_sizes: Optional[list[int]] = Field(None, description=(
        "the token-count buckets of those graphs (default: 16, 32, 64, 128, 256, ... up to prefill_max_tokens)"))

    @field_validator("batch_sizes", "prefill_token_sizes")
    @classmethod
    def _positive(cls, v, info):
        if v is not None and any(x < 1 for x in v):
            raise ValueError(f"{info.field_name}={v}: every size must be a positive integer")
        return v


def _power_of_two(name: str, v: Optional[int], low: int, high: int) -> Optional[int]:
    if v is not None and not (low <= v <= high and v & (v - 1) == 0):
        raise ValueError(f"{name}={v}: must be a power of two from {low} to {high}")
    return v


class KernelConfig(StrictModel):
    """Triton kernel settings, sent to every rank. A field left None takes the value tuned for the
    rank's GPU (meshserve/kernels/settings.py; the H200's where a GPU has no row of its own)."""
    disable_triton: bool = Field(False, description=(
        "norm, rotary, activation, argmax and skinny GEMMs take torch ops instead of the fused Triton "
        "kernels (attention follows attention_backend)"))
    gemv_max_m: Optional[int] = Field(None, ge=0, le=16, description=(
        "CUDA linears with up to this many rows of input take the skinny-GEMM kernel instead of cuBLAS; 0: never"))
    attn_decode_split_tiles: Optional[int] = Field(None, ge=1, le=1024, description=(
        "decode attention: the fewest KV tiles (attn_decode_block_n keys each) one KV split covers; "
        "unset: 1 for steps of up to 8 sequences, else 2"))
    attn_decode_block_n: Optional[int] = Field(None, description=(
        "decode attention: keys per KV tile; unset: 128 for steps of up to 8 sequences, else 64"))
    attn_decode_warps: Optional[int] = Field(None, ge=0, le=16, description=(
        "decode attention: warps per program; unset or 0: 4 for up to 8 sequences, else 2"))
    attn_prefill_rows: Optional[int] = Field(None, description=(
        "prefill attention: (query token x head) rows per tile in steps of more than attn_prefill_large_tokens"))
    attn_prefill_stages: Optional[int] = Field(None, ge=1, le=8, description="pipeline stages of those tiles")
    attn_prefill_rows_small: Optional[int] = Field(None, description=(
        "rows per tile in steps of up to attn_prefill_large_tokens tokens"))
    attn_prefill_stages_small: Optional[int] = Field(None, ge=1, le=8, description="pipeline stages of those tiles")
    attn_prefill_large_tokens: Optional[int] = Field(None, ge=1, description=(
        "steps of more than this many tokens take the large prefill tiles (also a mixed-step CUDA graph bucket)"))
    attn_prefill_block_n: Optional[int] = Field(None, description="prefill attention: keys per KV tile")
    attn_prefill_warps: Optional[int] = Field(None, description="prefill attention: warps per program")
    attn_heavy_first: Optional[bool] = Field(None, description=(
        "prefill attention: launch each sequence's last query tiles (which see the most keys) first"))
    pdl: Optional[bool] = Field(None, description=(
        "launch the Triton kernels with programmatic dependent launch: each one starts while the one before "
        "it finishes (weights of the skinny GEMMs load early); needs a GPU of compute capability 9.0 or newer"))
    pdl_max_tokens: Optional[int] = Field(None, ge=1, description=(
        "with pdl: only steps of up to this many tokens launch with PDL (in larger steps the next kernel's "
        "early blocks take SMs from the running one)"))
    fuse_rope_attention: Optional[bool] = Field(None, description=(
        "decode steps (Triton attention): q's rotary (and Qwen3's q/k norm) and the KV write of the new "
        "token run inside the attention kernel instead of a kernel of their own"))
    fuse_norm_linear: Optional[Union[bool, Literal["attention", "mlp"]]] = Field(None, description=(
        "one-row steps (batch-1 decode): each RMSNorm runs inside the skinny GEMM that reads it (q/k/v, "
        "the MLP's gate_up, an MoE router gate with its top-k): one kernel instead of two or three; "
        "'attention' or 'mlp': only the norm before that part"))
    decode_l2_prefetch: Optional[bool] = Field(None, description=(
        "decode steps of up to 8 sequences (Triton attention): the attention kernel first asks for the "
        "layer's output-projection weight in L2, so it moves from HBM while attention runs and the "
        "projection after it reads L2"))
    l2_prefetch_next_layer: Optional[bool] = Field(None, description=(
        "one-row steps (batch-1 decode) of MoE models: the router gate's kernel first asks for the next "
        "layer's q/k/v weight in L2 (it moves while the router runs), and the experts' decode kernels "
        "load their weights evict-first so it stays in L2 until that layer reads it"))

    @field_validator("attn_prefill_rows", "attn_prefill_rows_small")
    @classmethod
    def _rows(cls, v, info):
        return _power_of_two(info.field_name, v, 16, 1024)

    @field_validator("attn_prefill_block_n", "attn_decode_block_n")
    @classmethod
    def _block_n(cls, v, info):
        return _power_of_two(info.field_name, v, 16, 256)

    @field_validator("attn_prefill_warps")
    @classmethod
    def _warps(cls, v, info):
        return _power_of_two(info.field_name, v, 1, 16)

    @field_validator("attn_decode_warps")
    @classmethod
    def _decode_warps(cls, v, info):
        return v if v == 0 else _power_of_two(info.field_name, v, 1, 16)


class PyTorchBackendConfig(StrictModel):
    enable_overlap_scheduler: bool = True


class AttentionDpConfig(StrictModel):
    enable_balance: bool = False
    timeout_iters: int = Field(50, ge=0)
    batching_wait_iters: int = Field(10, ge=0)


class StructuredOutputsConfig(StrictModel):
    """vLLM's structured_outputs_config: the engine's defaults for requests with structured outputs."""
    backend: Literal["auto", "xgrammar"] = Field("auto", description="grammar library (xgrammar; auto picks it)")
    disable_any_whitespace: bool = Field(False, description=(
        "JSON outputs (json schemas, json_object) without free whitespace between tokens, for every request"))


class MoeConfig(StrictModel):
    backend: str = "auto"


class CacheTransceiverConfig(StrictModel):
    """Disaggregated serving (docs/disaggregated.md): this server's ranks serve reads of their KV
    blocks (context server) and pull a request's KV from another server's ranks (generation server)."""
    backend: str = Field("DEFAULT", description=(
        "KV transfer backend: DEFAULT (TCP), NIXL, UCX, or MPI (servers started in one mpirun); docs/kv_backends.md"))
    max_tokens_in_buffer: Optional[int] = Field(None, ge=1, description=(
        "tokens of one layer a transfer moves per chunk (default: the backend's)"))
    kv_transfer_timeout_ms: int = Field(30000, ge=1, le=2**31 - 1, description=(
        "a context request's KV stays pinned this long without the generation server's release; "
        "a generation server gives up a pull after this long (at most 2**31 - 1 ms, ~24.8 days: socket "
        "timeouts much longer overflow, which failed every pull)"))
    host: str = Field("127.0.0.1", description=(
        "address every rank's KV transfer endpoint binds to (what generation servers connect to)"))
    verify_payload: Union[bool, Literal["auto"]] = Field("auto", description=(
        "as a generation server, check each pulled KV chunk's MAC (keyed by the shared key, bound to the "
        "connection and the chunk) before writing it into the KV cache; a mismatch fails the transfer. "
        "DEFAULT, UCX and MPI backends (NIXL's one-sided reads carry none). auto (default): on unless the "
        "context rank is this host over loopback (there anyone able to alter the traffic can read the key "
        "file); true / false: always / never (~2 GB/s of hashing per side; docs/kv_backends.md)"))
    cuda_ipc: Union[bool, Literal["auto"]] = Field("auto", description=(
        "DEFAULT backend: move the KV GPU to GPU with CUDA IPC when both servers' KV caches are CUDA tensors "
        "on the same host (else TCP). auto (default): when possible, falling back to TCP; true: refuse "
        "(fail the transfer, or stop at startup) where it cannot be used; false: never (a context server "
        "then exports no handles)"))

    @field_validator("verify_payload", "cuda_ipc", mode="before")
    @classmethod
    def _auto_true_false(cls, v):
        if isinstance(v, bool):
            return v
        if isinstance(v, str) and v.strip().lower() in ("auto", "true", "false"):
            return {"auto": "auto", "true": True, "false": False}[v.strip().lower()]
        raise ValueError("accepted: auto, true, false")


class LlmArgs(StrictModel):
    model: Optional[str] = None
    tokenizer: Optional[str] = None
    revision: Optional[str] = Field(None, description=(
        "the Hub revision (branch, tag or commit) of a model given as a Hugging Face Hub id; default: main"))
    tokenizer_revision: Optional[str] = Field(None, description=(
        "the Hub revision of the tokenizer (the model's when `tokenizer` is unset) given as a Hub id; "
        "default: main"))
    dtype: str = "auto"
    load_format: str = "auto"
    quantization: Optional[str] = Field(None, description=(
        "fp8: hold the linear layers' weights in FP8 (e4m3, one scale per block of 128 x 128 or smaller), "
        "quantised at load from a full-precision checkpoint. An FP8 block-quantised checkpoint "
        "(quantization_config quant_method fp8) loads as FP8 whatever this says. None (default): the "
        "checkpoint's own format"))
    device: str = "auto"
    attention_backend: str = "auto"
    kernel_config: KernelConfig = Field(default_factory=KernelConfig)
    backend: Optional[str] = "pytorch"
    max_batch_size: int = Field(256, ge=1)
    max_n: Optional[int] = Field(None, ge=1, description=(
        "most sequences one request may ask for (SamplingParams.n, the API's n / best_of); more is refused "
        "with an error naming the limit. Default None: max_batch_size, the sequences one engine step runs"))
    max_num_tokens: int = Field(8192, ge=1)
    max_seq_len: Optional[int] = Field(None, ge=2)
    kv_cache_config: KvCacheConfig = Field(default_factory=KvCacheConfig)
    enable_chunked_prefill: bool = True
    scheduling_policy: Literal["fcfs", "priority"] = Field("fcfs", description=(
        "vLLM's: fcfs (arrival order) or priority (a request's priority, lower first, then arrival: the waiting "
        "queue, the step's token budget and the choice of a preemption's victim follow it)"))
    seed: int = 0
    tensor_parallel_size: int = Field(1, ge=1)
    pipeline_parallel_size: int = Field(1, ge=1)
    context_parallel_size: int = Field(1, ge=1)
    moe_expert_parallel_size: Optional[int] = Field(None, ge=1)
    moe_tensor_parallel_size: Optional[int] = Field(None, ge=1)
    pp_partition: Optional[list[int]] = None
    pipeline_micro_batches: Optional[int] = Field(None, ge=1, description="batches in flight (default pp size)")
    enable_attention_dp: bool = False
    attention_dp_config: AttentionDpConfig = Field(default_factory=AttentionDpConfig)
    cp_config: Optional[dict[str, Any]] = None
    moe_config: MoeConfig = Field(default_factory=MoeConfig)
    structured_outputs_config: StructuredOutputsConfig = Field(default_factory=StructuredOutputsConfig)
    generation_config: str = Field("auto", description=(
        "vLLM's: auto (a request's unset sampling fields take the model's generation_config.json values), vllm "
        "(built-in defaults), or a folder holding a generation_config.json"))
    guided_decoding_backend: Optional[Literal["xgrammar"]] = Field(None, description=(
        "TensorRT-LLM's name of the grammar library: xgrammar, the only one here (structured outputs are on "
        "either way)"))
    orchestrator_type: Optional[str] = None
    disable_overlap_scheduler: bool = False
    overlap_late_launch: bool = Field(False, description=(
        "server with the overlap scheduler: launch the next batch shortly before the running one is due "
        "to finish, not as soon as it starts, so that requests arriving meanwhile join the next batch"))
    pytorch_backend_config: Optional[PyTorchBackendConfig] = None
    cuda_graph_config: Optional[CudaGraphConfig] = Field(default_factory=CudaGraphConfig)
    cache_transceiver_config: Optional[CacheTransceiverConfig] = None
    trust_remote_code: bool = False
    skip_tokenizer_init: bool = False
    show_progress: bool = True
    max_waiting_requests: Optional[int] = Field(None, ge=1)
    slow_step_ms: float = Field(1000.0, ge=0, description=(
        "log an engine step slower than this many milliseconds with its shape (at INFO, at most one line "
        "per 30 s); 0: never"))
    stream_interval: int = Field(1, ge=1, description=(
        "server streaming: send a stream's text every this many tokens (the first token and the end "
        "at once), fewer, larger events for less API-server and client CPU per token"))

    @field_validator("generation_config")
    @classmethod
    def _generation_config(cls, v: str) -> str:
        from meshserve.generation_defaults import check_generation_config
        return check_generation_config(v)

    @field_validator("dtype")
    @classmethod
    def _dtype(cls, v: str) -> str:
        accepted = ("auto", "float32", "float", "bfloat16", "float16", "half")
        if v not in accepted:
            raise ValueError(f"dtype={v!r} is not supported; accepted: {', '.join(accepted)}")
        return v

    @field_validator("load_format")
    @classmethod
    def _load_format(cls, v: str) -> str:
        accepted = ("auto", "safetensors", "gguf", "dummy")
        if v not in accepted:
            raise ValueError(f"load_format={v!r} is not supported; accepted: {', '.join(accepted)}")
        return v

    @field_validator("quantization")
    @classmethod
    def _quantization(cls, v: Optional[str]) -> Optional[str]:
        if v is None:
            return None
        if v.lower() not in ("fp8", "none"):
            raise ValueError(f"quantization={v!r} is not supported; accepted: fp8, or none (the checkpoint's format)")
        return None if v.lower() == "none" else "fp8"

    @field_validator("orchestrator_type")
    @classmethod
    def _orchestrator(cls, v: Optional[str]) -> Optional[str]:
        if v not in (None, "mpi", "spawn", "mp", "ray"):
            raise ValueError(f"orchestrator_type={v!r} is not supported; accepted: None, 'mpi' (same as None: "
                             f"MPI ranks are used when mpirun started the process), 'spawn' (ignore launcher "
                             f"variables), 'mp' (worker-process executor even for one rank), 'ray' (worker "
                             f"ranks as Ray actors, on this host or the cluster of RAY_ADDRESS)")
        return v

    @field_validator("cp_config", mode="before")
    @classmethod
    def _cp_config(cls, v):
        """{"cp_type": CpType.ULYSSES | "ulysses" | ...}: cp_type kept as its name (JSON-safe for the ranks)."""
        if v is None:
            return None
        if not isinstance(v, dict):
            raise ValueError(f"cp_config must be a mapping such as {{'cp_type': 'ULYSSES'}}, got {v!r}")
        unknown = sorted(str(k) for k in v if k != "cp_type")
        if unknown:
            raise ValueError(f"cp_config has unknown keys {unknown}; accepted: cp_type")
        from meshserve.mapping import CpType
        return {"cp_type": CpType.from_string(v.get("cp_type", "ULYSSES")).name}

    @field_validator("device")
    @classmethod
    def _device(cls, v: str) -> str:
        if v != "auto" and not (v == "cpu" or v.startswith("cuda")):
            raise ValueError(f"device={v!r} is not supported; accepted: auto, cpu, cuda, cuda:N")
        return v

    @property
    def overlap_scheduler(self) -> bool:
        if self.disable_overlap_scheduler:
            return False
        if self.pytorch_backend_config is not None:
            return self.pytorch_backend_config.enable_overlap_scheduler
        return True


# vLLM's names for settings these arguments spell the TensorRT-LLM way: an unknown key that is one of
# them is answered with ours (not taken as an alias: gpu_memory_utilization is a share of the whole GPU,
# free_gpu_memory_fraction of the memory left after the weights)
VLLM_KEYS = {"max_model_len": "max_seq_len", "max_num_seqs": "max_batch_size",
             "max_num_batched_tokens": "max_num_tokens", "gpu_memory_utilization": "kv_cache_config.free_gpu_memory_fraction",
             "enforce_eager": "cuda_graph_config={'enable': False}", "kv_cache_dtype": "kv_cache_config.dtype",
             "enable_prefix_caching": "kv_cache_config.enable_block_reuse", "enable_expert_parallel": "moe_expert_parallel_size"}


def _did_you_mean(key: str, accepted: list[str], top_level: bool) -> str:
    if top_level and key in VLLM_KEYS:
        return f" (vLLM's name; here: {VLLM_KEYS[key]})"
    close = nearest(key, accepted)
    return f" (did you mean {close!r}?)" if close else ""


def format_validation_error(err: ValidationError, where: str) -> str:
    lines = []
    for e in err.errors():
        loc = ".".join(str(x) for x in e["loc"])
        if e["type"] == "extra_forbidden":
            model = _model_at(LlmArgs, e["loc"][:-1])
            fields = sorted(model.model_fields) if model else []
            hint = _did_you_mean(str(e["loc"][-1]), fields, len(e["loc"]) == 1)
            lines.append(f"unknown key {loc!r} in {where}{hint}; accepted keys: {', '.join(fields) or '?'}")
        else:
            lines.append(f"{where}: {loc}={e.get('input')!r}: {e['msg']}")
    return "; ".join(lines)


def _model_at(model, loc):
    for key in loc:
        if isinstance(key, int):
            continue
        field = model.model_fields.get(key)
        if field is None:
            return None
        ann = field.annotation
        inner = [a for a in getattr(ann, "__args__", (ann,)) if isinstance(a, type) and issubclass(a, BaseModel)]
        if not inner:
            return None
        model = inner[0]
    return model


def build_llm_args(where: str = "LLM()", **kwargs) -> LlmArgs:
    try:
        return LlmArgs(**kwargs)
    except ValidationError as e:
        raise ValueError(format_validation_error(e, where)) from None


class _UniqueKeyLoader(yaml.SafeLoader):
    """yaml.safe_load's loader, refusing a key given twice in one mapping (PyYAML keeps the last one,
    so the first value would be accepted and silently ignored)."""

    def construct_mapping(self, node, deep=False):
        if isinstance(node, yaml.MappingNode):
            seen = set()
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":  # `<<: *anchor`: its keys may be overridden
                    continue
                key = self.construct_object(key_node, deep=True)
                try:
                    duplicate = key in seen
                    seen.add(key)
                except TypeError:  # an unhashable key: the base class says so
                    break
                if duplicate:
                    raise yaml.constructor.ConstructorError(
                        None, None, f"duplicate key {key!r} (each key may be given once)", key_node.start_mark)
        return super().construct_mapping(node, deep=deep)


def safe_load_unique(stream):
    """yaml.safe_load, with a key given twice in one mapping a yaml.YAMLError naming it and its line."""
    return yaml.load(stream, Loader=_UniqueKeyLoader)  # noqa: S506 - a SafeLoader subclass


def load_yaml_config(path: str) -> dict:
    with open(path) as f:
        data = safe_load_unique(f) or {}
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a mapping of option names to values, got {type(data).__name__}")
    return data
