import datetime

from google.protobuf import empty_pb2 as _empty_pb2
from google.protobuf import timestamp_pb2 as _timestamp_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class ComputationRunReq(_message.Message):
    __slots__ = ("id", "name", "description", "datasets", "algorithm", "result_consumers", "agent_config", "ttl", "vcpus", "memory_mib")
    ID_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    DESCRIPTION_FIELD_NUMBER: _ClassVar[int]
    DATASETS_FIELD_NUMBER: _ClassVar[int]
    ALGORITHM_FIELD_NUMBER: _ClassVar[int]
    RESULT_CONSUMERS_FIELD_NUMBER: _ClassVar[int]
    AGENT_CONFIG_FIELD_NUMBER: _ClassVar[int]
    TTL_FIELD_NUMBER: _ClassVar[int]
    VCPUS_FIELD_NUMBER: _ClassVar[int]
    MEMORY_MIB_FIELD_NUMBER: _ClassVar[int]
    id: str
    name: str
    description: str
    datasets: _containers.RepeatedCompositeFieldContainer[Dataset]
    algorithm: Algorithm
    result_consumers: _containers.RepeatedScalarFieldContainer[str]
    agent_config: AgentConfig
    ttl: str
    vcpus: int
    memory_mib: int
    def __init__(self, id: _Optional[str] = ..., name: _Optional[str] = ..., description: _Optional[str] = ..., datasets: _Optional[_Iterable[_Union[Dataset, _Mapping]]] = ..., algorithm: _Optional[_Union[Algorithm, _Mapping]] = ..., result_consumers: _Optional[_Iterable[str]] = ..., agent_config: _Optional[_Union[AgentConfig, _Mapping]] = ..., ttl: _Optional[str] = ..., vcpus: _Optional[int] = ..., memory_mib: _Optional[int] = ...) -> None: ...

class Dataset(_message.Message):
    __slots__ = ("provider", "id", "hash")
    PROVIDER_FIELD_NUMBER: _ClassVar[int]
    ID_FIELD_NUMBER: _ClassVar[int]
    HASH_FIELD_NUMBER: _ClassVar[int]
    provider: str
    id: str
    hash: bytes
    def __init__(self, provider: _Optional[str] = ..., id: _Optional[str] = ..., hash: _Optional[bytes] = ...) -> None: ...

class Algorithm(_message.Message):
    __slots__ = ("provider", "id", "hash")
    PROVIDER_FIELD_NUMBER: _ClassVar[int]
    ID_FIELD_NUMBER: _ClassVar[int]
    HASH_FIELD_NUMBER: _ClassVar[int]
    provider: str
    id: str
    hash: bytes
    def __init__(self, provider: _Optional[str] = ..., id: _Optional[str] = ..., hash: _Optional[bytes] = ...) -> None: ...

class AgentConfig(_message.Message):
    __slots__ = ("port", "host", "cert_file", "key_file", "client_ca_file", "server_ca_file", "log_level", "attested_tls")
    PORT_FIELD_NUMBER: _ClassVar[int]
    HOST_FIELD_NUMBER: _ClassVar[int]
    CERT_FILE_FIELD_NUMBER: _ClassVar[int]
    KEY_FILE_FIELD_NUMBER: _ClassVar[int]
    CLIENT_CA_FILE_FIELD_NUMBER: _ClassVar[int]
    SERVER_CA_FILE_FIELD_NUMBER: _ClassVar[int]
    LOG_LEVEL_FIELD_NUMBER: _ClassVar[int]
    ATTESTED_TLS_FIELD_NUMBER: _ClassVar[int]
    port: str
    host: str
    cert_file: str
    key_file: str
    client_ca_file: str
    server_ca_file: str
    log_level: str
    attested_tls: bool
    def __init__(self, port: _Optional[str] = ..., host: _Optional[str] = ..., cert_file: _Optional[str] = ..., key_file: _Optional[str] = ..., client_ca_file: _Optional[str] = ..., server_ca_file: _Optional[str] = ..., log_level: _Optional[str] = ..., attested_tls: _Optional[bool] = ...) -> None: ...

class RunResponse(_message.Message):
    __slots__ = ("agent_port", "computation_id")
    AGENT_PORT_FIELD_NUMBER: _ClassVar[int]
    COMPUTATION_ID_FIELD_NUMBER: _ClassVar[int]
    agent_port: str
    computation_id: str
    def __init__(self, agent_port: _Optional[str] = ..., computation_id: _Optional[str] = ...) -> None: ...

class StopRequest(_message.Message):
    __slots__ = ("computation_id", "force")
    COMPUTATION_ID_FIELD_NUMBER: _ClassVar[int]
    FORCE_FIELD_NUMBER: _ClassVar[int]
    computation_id: str
    force: bool
    def __init__(self, computation_id: _Optional[str] = ..., force: _Optional[bool] = ...) -> None: ...

class StopResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class EventsRequest(_message.Message):
    __slots__ = ("computation_id", "since")
    COMPUTATION_ID_FIELD_NUMBER: _ClassVar[int]
    SINCE_FIELD_NUMBER: _ClassVar[int]
    computation_id: str
    since: int
    def __init__(self, computation_id: _Optional[str] = ..., since: _Optional[int] = ...) -> None: ...

class AgentEvent(_message.Message):
    __slots__ = ("event_type", "timestamp", "computation_id", "details", "originator", "status")
    EVENT_TYPE_FIELD_NUMBER: _ClassVar[int]
    TIMESTAMP_FIELD_NUMBER: _ClassVar[int]
    COMPUTATION_ID_FIELD_NUMBER: _ClassVar[int]
    DETAILS_FIELD_NUMBER: _ClassVar[int]
    ORIGINATOR_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    event_type: str
    timestamp: _timestamp_pb2.Timestamp
    computation_id: str
    details: bytes
    originator: str
    status: str
    def __init__(self, event_type: _Optional[str] = ..., timestamp: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., computation_id: _Optional[str] = ..., details: _Optional[bytes] = ..., originator: _Optional[str] = ..., status: _Optional[str] = ...) -> None: ...

class AgentLog(_message.Message):
    __slots__ = ("message", "computation_id", "level", "timestamp")
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    COMPUTATION_ID_FIELD_NUMBER: _ClassVar[int]
    LEVEL_FIELD_NUMBER: _ClassVar[int]
    TIMESTAMP_FIELD_NUMBER: _ClassVar[int]
    message: str
    computation_id: str
    level: str
    timestamp: _timestamp_pb2.Timestamp
    def __init__(self, message: _Optional[str] = ..., computation_id: _Optional[str] = ..., level: _Optional[str] = ..., timestamp: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ...) -> None: ...

class ClientStreamMessage(_message.Message):
    __slots__ = ("agent_log", "agent_event", "run_res", "seq")
    AGENT_LOG_FIELD_NUMBER: _ClassVar[int]
    AGENT_EVENT_FIELD_NUMBER: _ClassVar[int]
    RUN_RES_FIELD_NUMBER: _ClassVar[int]
    SEQ_FIELD_NUMBER: _ClassVar[int]
    agent_log: AgentLog
    agent_event: AgentEvent
    run_res: RunResponse
    seq: int
    def __init__(self, agent_log: _Optional[_Union[AgentLog, _Mapping]] = ..., agent_event: _Optional[_Union[AgentEvent, _Mapping]] = ..., run_res: _Optional[_Union[RunResponse, _Mapping]] = ..., seq: _Optional[int] = ...) -> None: ...

class AttestationPolicyRequest(_message.Message):
    __slots__ = ("computation_id",)
    COMPUTATION_ID_FIELD_NUMBER: _ClassVar[int]
    computation_id: str
    def __init__(self, computation_id: _Optional[str] = ...) -> None: ...

class AttestationPolicyResponse(_message.Message):
    __slots__ = ("info", "computation_id")
    INFO_FIELD_NUMBER: _ClassVar[int]
    COMPUTATION_ID_FIELD_NUMBER: _ClassVar[int]
    info: bytes
    computation_id: str
    def __init__(self, info: _Optional[bytes] = ..., computation_id: _Optional[str] = ...) -> None: ...

class ListRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ListResponse(_message.Message):
    __slots__ = ("computations",)
    COMPUTATIONS_FIELD_NUMBER: _ClassVar[int]
    computations: _containers.RepeatedCompositeFieldContainer[ComputationInfo]
    def __init__(self, computations: _Optional[_Iterable[_Union[ComputationInfo, _Mapping]]] = ...) -> None: ...

class ComputationInfo(_message.Message):
    __slots__ = ("computation_id", "state", "agent_port", "guest_cid", "vnc_display", "pid", "started_at", "expires_at", "adopted")
    COMPUTATION_ID_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    AGENT_PORT_FIELD_NUMBER: _ClassVar[int]
    GUEST_CID_FIELD_NUMBER: _ClassVar[int]
    VNC_DISPLAY_FIELD_NUMBER: _ClassVar[int]
    PID_FIELD_NUMBER: _ClassVar[int]
    STARTED_AT_FIELD_NUMBER: _ClassVar[int]
    EXPIRES_AT_FIELD_NUMBER: _ClassVar[int]
    ADOPTED_FIELD_NUMBER: _ClassVar[int]
    computation_id: str
    state: str
    agent_port: str
    guest_cid: int
    vnc_display: int
    pid: int
    started_at: _timestamp_pb2.Timestamp
    expires_at: _timestamp_pb2.Timestamp
    adopted: bool
    def __init__(self, computation_id: _Optional[str] = ..., state: _Optional[str] = ..., agent_port: _Optional[str] = ..., guest_cid: _Optional[int] = ..., vnc_display: _Optional[int] = ..., pid: _Optional[int] = ..., started_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., expires_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., adopted: _Optional[bool] = ...) -> None: ...

class LogsRequest(_message.Message):
    __slots__ = ("computation_id", "tail", "follow")
    COMPUTATION_ID_FIELD_NUMBER: _ClassVar[int]
    TAIL_FIELD_NUMBER: _ClassVar[int]
    FOLLOW_FIELD_NUMBER: _ClassVar[int]
    computation_id: str
    tail: int
    follow: bool
    def __init__(self, computation_id: _Optional[str] = ..., tail: _Optional[int] = ..., follow: _Optional[bool] = ...) -> None: ...

class CreateReq(_message.Message):
    __slots__ = ("agent_log_level", "agent_cvm_server_ca_cert", "agent_cvm_client_key", "agent_cvm_client_cert", "agent_cvm_server_url", "agent_cvm_ca_url", "ttl", "agent_certs_token", "aws_access_key_id", "aws_secret_access_key", "aws_endpoint_url", "aws_region", "aa_kbs_params")
    AGENT_LOG_LEVEL_FIELD_NUMBER: _ClassVar[int]
    AGENT_CVM_SERVER_CA_CERT_FIELD_NUMBER: _ClassVar[int]
    AGENT_CVM_CLIENT_KEY_FIELD_NUMBER: _ClassVar[int]
    AGENT_CVM_CLIENT_CERT_FIELD_NUMBER: _ClassVar[int]
    AGENT_CVM_SERVER_URL_FIELD_NUMBER: _ClassVar[int]
    AGENT_CVM_CA_URL_FIELD_NUMBER: _ClassVar[int]
    TTL_FIELD_NUMBER: _ClassVar[int]
    AGENT_CERTS_TOKEN_FIELD_NUMBER: _ClassVar[int]
    AWS_ACCESS_KEY_ID_FIELD_NUMBER: _ClassVar[int]
    AWS_SECRET_ACCESS_KEY_FIELD_NUMBER: _ClassVar[int]
    AWS_ENDPOINT_URL_FIELD_NUMBER: _ClassVar[int]
    AWS_REGION_FIELD_NUMBER: _ClassVar[int]
    AA_KBS_PARAMS_FIELD_NUMBER: _ClassVar[int]
    agent_log_level: str
    agent_cvm_server_ca_cert: bytes
    agent_cvm_client_key: bytes
    agent_cvm_client_cert: bytes
    agent_cvm_server_url: str
    agent_cvm_ca_url: str
    ttl: str
    agent_certs_token: str
    aws_access_key_id: str
    aws_secret_access_key: str
    aws_endpoint_url: str
    aws_region: str
    aa_kbs_params: str
    def __init__(self, agent_log_level: _Optional[str] = ..., agent_cvm_server_ca_cert: _Optional[bytes] = ..., agent_cvm_client_key: _Optional[bytes] = ..., agent_cvm_client_cert: _Optional[bytes] = ..., agent_cvm_server_url: _Optional[str] = ..., agent_cvm_ca_url: _Optional[str] = ..., ttl: _Optional[str] = ..., agent_certs_token: _Optional[str] = ..., aws_access_key_id: _Optional[str] = ..., aws_secret_access_key: _Optional[str] = ..., aws_endpoint_url: _Optional[str] = ..., aws_region: _Optional[str] = ..., aa_kbs_params: _Optional[str] = ...) -> None: ...

class CreateRes(_message.Message):
    __slots__ = ("forwarded_port", "cvm_id")
    FORWARDED_PORT_FIELD_NUMBER: _ClassVar[int]
    CVM_ID_FIELD_NUMBER: _ClassVar[int]
    forwarded_port: str
    cvm_id: str
    def __init__(self, forwarded_port: _Optional[str] = ..., cvm_id: _Optional[str] = ...) -> None: ...

class RemoveReq(_message.Message):
    __slots__ = ("cvm_id",)
    CVM_ID_FIELD_NUMBER: _ClassVar[int]
    cvm_id: str
    def __init__(self, cvm_id: _Optional[str] = ...) -> None: ...

class CVMInfoReq(_message.Message):
    __slots__ = ("id",)
    ID_FIELD_NUMBER: _ClassVar[int]
    id: str
    def __init__(self, id: _Optional[str] = ...) -> None: ...

class CVMInfoRes(_message.Message):
    __slots__ = ("id", "ovmf_version", "cpu_num", "cpu_type", "kernel_cmd", "eos_version")
    ID_FIELD_NUMBER: _ClassVar[int]
    OVMF_VERSION_FIELD_NUMBER: _ClassVar[int]
    CPU_NUM_FIELD_NUMBER: _ClassVar[int]
    CPU_TYPE_FIELD_NUMBER: _ClassVar[int]
    KERNEL_CMD_FIELD_NUMBER: _ClassVar[int]
    EOS_VERSION_FIELD_NUMBER: _ClassVar[int]
    id: str
    ovmf_version: str
    cpu_num: int
    cpu_type: str
    kernel_cmd: str
    eos_version: str
    def __init__(self, id: _Optional[str] = ..., ovmf_version: _Optional[str] = ..., cpu_num: _Optional[int] = ..., cpu_type: _Optional[str] = ..., kernel_cmd: _Optional[str] = ..., eos_version: _Optional[str] = ...) -> None: ...

class PauseRequest(_message.Message):
    __slots__ = ("computation_id",)
    COMPUTATION_ID_FIELD_NUMBER: _ClassVar[int]
    computation_id: str
    def __init__(self, computation_id: _Optional[str] = ...) -> None: ...

class PauseResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ResumeRequest(_message.Message):
    __slots__ = ("computation_id",)
    COMPUTATION_ID_FIELD_NUMBER: _ClassVar[int]
    computation_id: str
    def __init__(self, computation_id: _Optional[str] = ...) -> None: ...

class ResumeResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class GetRequest(_message.Message):
    __slots__ = ("computation_id",)
    COMPUTATION_ID_FIELD_NUMBER: _ClassVar[int]
    computation_id: str
    def __init__(self, computation_id: _Optional[str] = ...) -> None: ...

class GetResponse(_message.Message):
    __slots__ = ("computation", "qemu_argv", "files", "settings", "confidential_mode", "binding", "ttl", "vcpus", "memory_mib", "paused_by", "last_exit")
    class FilesEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    class SettingsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    class BindingEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    COMPUTATION_FIELD_NUMBER: _ClassVar[int]
    QEMU_ARGV_FIELD_NUMBER: _ClassVar[int]
    FILES_FIELD_NUMBER: _ClassVar[int]
    SETTINGS_FIELD_NUMBER: _ClassVar[int]
    CONFIDENTIAL_MODE_FIELD_NUMBER: _ClassVar[int]
    BINDING_FIELD_NUMBER: _ClassVar[int]
    TTL_FIELD_NUMBER: _ClassVar[int]
    VCPUS_FIELD_NUMBER: _ClassVar[int]
    MEMORY_MIB_FIELD_NUMBER: _ClassVar[int]
    PAUSED_BY_FIELD_NUMBER: _ClassVar[int]
    LAST_EXIT_FIELD_NUMBER: _ClassVar[int]
    computation: ComputationInfo
    qemu_argv: _containers.RepeatedScalarFieldContainer[str]
    files: _containers.ScalarMap[str, str]
    settings: _containers.ScalarMap[str, str]
    confidential_mode: str
    binding: _containers.ScalarMap[str, str]
    ttl: str
    vcpus: int
    memory_mib: int
    paused_by: str
    last_exit: VmExit
    def __init__(self, computation: _Optional[_Union[ComputationInfo, _Mapping]] = ..., qemu_argv: _Optional[_Iterable[str]] = ..., files: _Optional[_Mapping[str, str]] = ..., settings: _Optional[_Mapping[str, str]] = ..., confidential_mode: _Optional[str] = ..., binding: _Optional[_Mapping[str, str]] = ..., ttl: _Optional[str] = ..., vcpus: _Optional[int] = ..., memory_mib: _Optional[int] = ..., paused_by: _Optional[str] = ..., last_exit: _Optional[_Union[VmExit, _Mapping]] = ...) -> None: ...

class VmExit(_message.Message):
    __slots__ = ("reason", "event_type", "status", "exit", "error", "ended_at", "last_lines", "stop_error")
    REASON_FIELD_NUMBER: _ClassVar[int]
    EVENT_TYPE_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    EXIT_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    ENDED_AT_FIELD_NUMBER: _ClassVar[int]
    LAST_LINES_FIELD_NUMBER: _ClassVar[int]
    STOP_ERROR_FIELD_NUMBER: _ClassVar[int]
    reason: str
    event_type: str
    status: str
    exit: str
    error: str
    ended_at: _timestamp_pb2.Timestamp
    last_lines: _containers.RepeatedScalarFieldContainer[str]
    stop_error: str
    def __init__(self, reason: _Optional[str] = ..., event_type: _Optional[str] = ..., status: _Optional[str] = ..., exit: _Optional[str] = ..., error: _Optional[str] = ..., ended_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., last_lines: _Optional[_Iterable[str]] = ..., stop_error: _Optional[str] = ...) -> None: ...
