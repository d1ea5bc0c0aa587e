from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from typing import ClassVar as _ClassVar, Iterable as _Iterable, Mapping as _Mapping, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Dtype(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    DTYPE_UNSPECIFIED: _ClassVar[Dtype]
    DTYPE_FLOAT32: _ClassVar[Dtype]
    DTYPE_FLOAT64: _ClassVar[Dtype]
    DTYPE_FLOAT16: _ClassVar[Dtype]
    DTYPE_BFLOAT16: _ClassVar[Dtype]
    DTYPE_INT8: _ClassVar[Dtype]
    DTYPE_INT16: _ClassVar[Dtype]
    DTYPE_INT32: _ClassVar[Dtype]
    DTYPE_INT64: _ClassVar[Dtype]
    DTYPE_UINT8: _ClassVar[Dtype]
    DTYPE_UINT16: _ClassVar[Dtype]
    DTYPE_UINT32: _ClassVar[Dtype]
    DTYPE_UINT64: _ClassVar[Dtype]
    DTYPE_BOOL: _ClassVar[Dtype]
    DTYPE_COMPLEX64: _ClassVar[Dtype]
    DTYPE_COMPLEX128: _ClassVar[Dtype]
    DTYPE_FLOAT8_E4M3FN: _ClassVar[Dtype]
    DTYPE_FLOAT8_E5M2: _ClassVar[Dtype]
    DTYPE_FLOAT8_E4M3FNUZ: _ClassVar[Dtype]
    DTYPE_FLOAT8_E5M2FNUZ: _ClassVar[Dtype]

class Transport(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    TRANSPORT_UNSPECIFIED: _ClassVar[Transport]
    TRANSPORT_INLINE: _ClassVar[Transport]
    TRANSPORT_SHARED_MEMORY: _ClassVar[Transport]
    TRANSPORT_CUDA_IPC: _ClassVar[Transport]

class DataPlaneFrameKind(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    DATA_PLANE_FRAME_KIND_UNSPECIFIED: _ClassVar[DataPlaneFrameKind]
    DATA_PLANE_FRAME_KIND_HELLO: _ClassVar[DataPlaneFrameKind]
    DATA_PLANE_FRAME_KIND_CALL: _ClassVar[DataPlaneFrameKind]
    DATA_PLANE_FRAME_KIND_BACKWARD: _ClassVar[DataPlaneFrameKind]
    DATA_PLANE_FRAME_KIND_RELEASE: _ClassVar[DataPlaneFrameKind]
    DATA_PLANE_FRAME_KIND_OK: _ClassVar[DataPlaneFrameKind]
    DATA_PLANE_FRAME_KIND_ERROR: _ClassVar[DataPlaneFrameKind]
DTYPE_UNSPECIFIED: Dtype
DTYPE_FLOAT32: Dtype
DTYPE_FLOAT64: Dtype
DTYPE_FLOAT16: Dtype
DTYPE_BFLOAT16: Dtype
DTYPE_INT8: Dtype
DTYPE_INT16: Dtype
DTYPE_INT32: Dtype
DTYPE_INT64: Dtype
DTYPE_UINT8: Dtype
DTYPE_UINT16: Dtype
DTYPE_UINT32: Dtype
DTYPE_UINT64: Dtype
DTYPE_BOOL: Dtype
DTYPE_COMPLEX64: Dtype
DTYPE_COMPLEX128: Dtype
DTYPE_FLOAT8_E4M3FN: Dtype
DTYPE_FLOAT8_E5M2: Dtype
DTYPE_FLOAT8_E4M3FNUZ: Dtype
DTYPE_FLOAT8_E5M2FNUZ: Dtype
TRANSPORT_UNSPECIFIED: Transport
TRANSPORT_INLINE: Transport
TRANSPORT_SHARED_MEMORY: Transport
TRANSPORT_CUDA_IPC: Transport
DATA_PLANE_FRAME_KIND_UNSPECIFIED: DataPlaneFrameKind
DATA_PLANE_FRAME_KIND_HELLO: DataPlaneFrameKind
DATA_PLANE_FRAME_KIND_CALL: DataPlaneFrameKind
DATA_PLANE_FRAME_KIND_BACKWARD: DataPlaneFrameKind
DATA_PLANE_FRAME_KIND_RELEASE: DataPlaneFrameKind
DATA_PLANE_FRAME_KIND_OK: DataPlaneFrameKind
DATA_PLANE_FRAME_KIND_ERROR: DataPlaneFrameKind

class SharedMemorySlice(_message.Message):
    __slots__ = ("region_id", "offset", "nbytes")
    REGION_ID_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    NBYTES_FIELD_NUMBER: _ClassVar[int]
    region_id: int
    offset: int
    nbytes: int
    def __init__(self, region_id: _Optional[int] = ..., offset: _Optional[int] = ..., nbytes: _Optional[int] = ...) -> None: ...

class CudaIpcSlice(_message.Message):
    __slots__ = ("region_id", "offset", "nbytes")
    REGION_ID_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    NBYTES_FIELD_NUMBER: _ClassVar[int]
    region_id: int
    offset: int
    nbytes: int
    def __init__(self, region_id: _Optional[int] = ..., offset: _Optional[int] = ..., nbytes: _Optional[int] = ...) -> None: ...

class Tensor(_message.Message):
    __slots__ = ("dtype", "shape", "shm", "cuda_ipc", "inline_data")
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    SHM_FIELD_NUMBER: _ClassVar[int]
    CUDA_IPC_FIELD_NUMBER: _ClassVar[int]
    INLINE_DATA_FIELD_NUMBER: _ClassVar[int]
    dtype: Dtype
    shape: _containers.RepeatedScalarFieldContainer[int]
    shm: SharedMemorySlice
    cuda_ipc: CudaIpcSlice
    inline_data: bytes
    def __init__(self, dtype: _Optional[_Union[Dtype, str]] = ..., shape: _Optional[_Iterable[int]] = ..., shm: _Optional[_Union[SharedMemorySlice, _Mapping]] = ..., cuda_ipc: _Optional[_Union[CudaIpcSlice, _Mapping]] = ..., inline_data: _Optional[bytes] = ...) -> None: ...

class TreeNode(_message.Message):
    __slots__ = ("kind", "num_children", "keys")
    class Kind(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
        __slots__ = ()
        KIND_UNSPECIFIED: _ClassVar[TreeNode.Kind]
        KIND_LEAF: _ClassVar[TreeNode.Kind]
        KIND_NONE: _ClassVar[TreeNode.Kind]
        KIND_TUPLE: _ClassVar[TreeNode.Kind]
        KIND_LIST: _ClassVar[TreeNode.Kind]
        KIND_DICT: _ClassVar[TreeNode.Kind]
    KIND_UNSPECIFIED: TreeNode.Kind
    KIND_LEAF: TreeNode.Kind
    KIND_NONE: TreeNode.Kind
    KIND_TUPLE: TreeNode.Kind
    KIND_LIST: TreeNode.Kind
    KIND_DICT: TreeNode.Kind
    KIND_FIELD_NUMBER: _ClassVar[int]
    NUM_CHILDREN_FIELD_NUMBER: _ClassVar[int]
    KEYS_FIELD_NUMBER: _ClassVar[int]
    kind: TreeNode.Kind
    num_children: int
    keys: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, kind: _Optional[_Union[TreeNode.Kind, str]] = ..., num_children: _Optional[int] = ..., keys: _Optional[_Iterable[str]] = ...) -> None: ...

class Tree(_message.Message):
    __slots__ = ("nodes", "leaves")
    NODES_FIELD_NUMBER: _ClassVar[int]
    LEAVES_FIELD_NUMBER: _ClassVar[int]
    nodes: _containers.RepeatedCompositeFieldContainer[TreeNode]
    leaves: _containers.RepeatedCompositeFieldContainer[Tensor]
    def __init__(self, nodes: _Optional[_Iterable[_Union[TreeNode, _Mapping]]] = ..., leaves: _Optional[_Iterable[_Union[Tensor, _Mapping]]] = ...) -> None: ...

class OutputArena(_message.Message):
    __slots__ = ("shm", "cuda_ipc")
    SHM_FIELD_NUMBER: _ClassVar[int]
    CUDA_IPC_FIELD_NUMBER: _ClassVar[int]
    shm: SharedMemorySlice
    cuda_ipc: CudaIpcSlice
    def __init__(self, shm: _Optional[_Union[SharedMemorySlice, _Mapping]] = ..., cuda_ipc: _Optional[_Union[CudaIpcSlice, _Mapping]] = ...) -> None: ...

class SharedMemoryRegion(_message.Message):
    __slots__ = ("name", "size")
    NAME_FIELD_NUMBER: _ClassVar[int]
    SIZE_FIELD_NUMBER: _ClassVar[int]
    name: str
    size: int
    def __init__(self, name: _Optional[str] = ..., size: _Optional[int] = ...) -> None: ...

class CudaIpcRegion(_message.Message):
    __slots__ = ("handle", "size", "device_uuid")
    HANDLE_FIELD_NUMBER: _ClassVar[int]
    SIZE_FIELD_NUMBER: _ClassVar[int]
    DEVICE_UUID_FIELD_NUMBER: _ClassVar[int]
    handle: bytes
    size: int
    device_uuid: str
    def __init__(self, handle: _Optional[bytes] = ..., size: _Optional[int] = ..., device_uuid: _Optional[str] = ...) -> None: ...

class OpenSessionRequest(_message.Message):
    __slots__ = ("client_pid", "client_hostname", "transport", "protocol_version")
    CLIENT_PID_FIELD_NUMBER: _ClassVar[int]
    CLIENT_HOSTNAME_FIELD_NUMBER: _ClassVar[int]
    TRANSPORT_FIELD_NUMBER: _ClassVar[int]
    PROTOCOL_VERSION_FIELD_NUMBER: _ClassVar[int]
    client_pid: int
    client_hostname: str
    transport: Transport
    protocol_version: int
    def __init__(self, client_pid: _Optional[int] = ..., client_hostname: _Optional[str] = ..., transport: _Optional[_Union[Transport, str]] = ..., protocol_version: _Optional[int] = ...) -> None: ...

class OpenSessionResponse(_message.Message):
    __slots__ = ("session_id", "worker_pid", "boot_id", "shm_directory", "max_inline_bytes", "protocol_version", "data_plane")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    WORKER_PID_FIELD_NUMBER: _ClassVar[int]
    BOOT_ID_FIELD_NUMBER: _ClassVar[int]
    SHM_DIRECTORY_FIELD_NUMBER: _ClassVar[int]
    MAX_INLINE_BYTES_FIELD_NUMBER: _ClassVar[int]
    PROTOCOL_VERSION_FIELD_NUMBER: _ClassVar[int]
    DATA_PLANE_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    worker_pid: int
    boot_id: str
    shm_directory: str
    max_inline_bytes: int
    protocol_version: int
    data_plane: DataPlaneOffer
    def __init__(self, session_id: _Optional[str] = ..., worker_pid: _Optional[int] = ..., boot_id: _Optional[str] = ..., shm_directory: _Optional[str] = ..., max_inline_bytes: _Optional[int] = ..., protocol_version: _Optional[int] = ..., data_plane: _Optional[_Union[DataPlaneOffer, _Mapping]] = ...) -> None: ...

class DataPlaneOffer(_message.Message):
    __slots__ = ("socket_path", "secret", "max_frame_bytes")
    SOCKET_PATH_FIELD_NUMBER: _ClassVar[int]
    SECRET_FIELD_NUMBER: _ClassVar[int]
    MAX_FRAME_BYTES_FIELD_NUMBER: _ClassVar[int]
    socket_path: str
    secret: bytes
    max_frame_bytes: int
    def __init__(self, socket_path: _Optional[str] = ..., secret: _Optional[bytes] = ..., max_frame_bytes: _Optional[int] = ...) -> None: ...

class DataPlaneHello(_message.Message):
    __slots__ = ("session_id", "secret")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    SECRET_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    secret: bytes
    def __init__(self, session_id: _Optional[str] = ..., secret: _Optional[bytes] = ...) -> None: ...

class DataPlaneStatus(_message.Message):
    __slots__ = ("code", "message")
    CODE_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    code: int
    message: str
    def __init__(self, code: _Optional[int] = ..., message: _Optional[str] = ...) -> None: ...

class RegisterRegionRequest(_message.Message):
    __slots__ = ("session_id", "shared_memory", "cuda_ipc")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    SHARED_MEMORY_FIELD_NUMBER: _ClassVar[int]
    CUDA_IPC_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    shared_memory: SharedMemoryRegion
    cuda_ipc: CudaIpcRegion
    def __init__(self, session_id: _Optional[str] = ..., shared_memory: _Optional[_Union[SharedMemoryRegion, _Mapping]] = ..., cuda_ipc: _Optional[_Union[CudaIpcRegion, _Mapping]] = ...) -> None: ...

class RegisterRegionResponse(_message.Message):
    __slots__ = ("region_id",)
    REGION_ID_FIELD_NUMBER: _ClassVar[int]
    region_id: int
    def __init__(self, region_id: _Optional[int] = ...) -> None: ...

class ReleaseRegionRequest(_message.Message):
    __slots__ = ("session_id", "region_id")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    REGION_ID_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    region_id: int
    def __init__(self, session_id: _Optional[str] = ..., region_id: _Optional[int] = ...) -> None: ...

class ReleaseRegionResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ListFunctionsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class FunctionInfo(_message.Message):
    __slots__ = ("name", "signature", "doc", "target")
    NAME_FIELD_NUMBER: _ClassVar[int]
    SIGNATURE_FIELD_NUMBER: _ClassVar[int]
    DOC_FIELD_NUMBER: _ClassVar[int]
    TARGET_FIELD_NUMBER: _ClassVar[int]
    name: str
    signature: str
    doc: str
    target: str
    def __init__(self, name: _Optional[str] = ..., signature: _Optional[str] = ..., doc: _Optional[str] = ..., target: _Optional[str] = ...) -> None: ...

class ListFunctionsResponse(_message.Message):
    __slots__ = ("functions",)
    FUNCTIONS_FIELD_NUMBER: _ClassVar[int]
    functions: _containers.RepeatedCompositeFieldContainer[FunctionInfo]
    def __init__(self, functions: _Optional[_Iterable[_Union[FunctionInfo, _Mapping]]] = ...) -> None: ...

class CallRequest(_message.Message):
    __slots__ = ("session_id", "function", "args", "kwargs", "keep_residuals", "has_aux", "output_arena", "no_grad_leaves")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    FUNCTION_FIELD_NUMBER: _ClassVar[int]
    ARGS_FIELD_NUMBER: _ClassVar[int]
    KWARGS_FIELD_NUMBER: _ClassVar[int]
    KEEP_RESIDUALS_FIELD_NUMBER: _ClassVar[int]
    HAS_AUX_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_ARENA_FIELD_NUMBER: _ClassVar[int]
    NO_GRAD_LEAVES_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    function: str
    args: Tree
    kwargs: Tree
    keep_residuals: bool
    has_aux: bool
    output_arena: OutputArena
    no_grad_leaves: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, session_id: _Optional[str] = ..., function: _Optional[str] = ..., args: _Optional[_Union[Tree, _Mapping]] = ..., kwargs: _Optional[_Union[Tree, _Mapping]] = ..., keep_residuals: bool = ..., has_aux: bool = ..., output_arena: _Optional[_Union[OutputArena, _Mapping]] = ..., no_grad_leaves: _Optional[_Iterable[int]] = ...) -> None: ...

class CallResponse(_message.Message):
    __slots__ = ("outputs", "aux", "residual_id", "required_output_bytes")
    OUTPUTS_FIELD_NUMBER: _ClassVar[int]
    AUX_FIELD_NUMBER: _ClassVar[int]
    RESIDUAL_ID_FIELD_NUMBER: _ClassVar[int]
    REQUIRED_OUTPUT_BYTES_FIELD_NUMBER: _ClassVar[int]
    outputs: Tree
    aux: Tree
    residual_id: int
    required_output_bytes: int
    def __init__(self, outputs: _Optional[_Union[Tree, _Mapping]] = ..., aux: _Optional[_Union[Tree, _Mapping]] = ..., residual_id: _Optional[int] = ..., required_output_bytes: _Optional[int] = ...) -> None: ...

class BackwardRequest(_message.Message):
    __slots__ = ("session_id", "residual_id", "cotangents", "output_arena", "keep_residuals")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    RESIDUAL_ID_FIELD_NUMBER: _ClassVar[int]
    COTANGENTS_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_ARENA_FIELD_NUMBER: _ClassVar[int]
    KEEP_RESIDUALS_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    residual_id: int
    cotangents: Tree
    output_arena: OutputArena
    keep_residuals: bool
    def __init__(self, session_id: _Optional[str] = ..., residual_id: _Optional[int] = ..., cotangents: _Optional[_Union[Tree, _Mapping]] = ..., output_arena: _Optional[_Union[OutputArena, _Mapping]] = ..., keep_residuals: bool = ...) -> None: ...

class BackwardResponse(_message.Message):
    __slots__ = ("grad_args", "grad_kwargs")
    GRAD_ARGS_FIELD_NUMBER: _ClassVar[int]
    GRAD_KWARGS_FIELD_NUMBER: _ClassVar[int]
    grad_args: Tree
    grad_kwargs: Tree
    def __init__(self, grad_args: _Optional[_Union[Tree, _Mapping]] = ..., grad_kwargs: _Optional[_Union[Tree, _Mapping]] = ...) -> None: ...

class ReleaseRequest(_message.Message):
    __slots__ = ("session_id", "residual_ids")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    RESIDUAL_IDS_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    residual_ids: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, session_id: _Optional[str] = ..., residual_ids: _Optional[_Iterable[int]] = ...) -> None: ...

class ReleaseResponse(_message.Message):
    __slots__ = ("released",)
    RELEASED_FIELD_NUMBER: _ClassVar[int]
    released: int
    def __init__(self, released: _Optional[int] = ...) -> None: ...
