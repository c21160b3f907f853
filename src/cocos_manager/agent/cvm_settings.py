"""Checking a CreateVm request and building what its agent is handed: the environment file
and the certificates of the two 9p shares, and the kernel parameter of `aa_kbs_params`.

Today's upstream Cocos agent fetches its work from the control plane itself; all the Manager
gives it are these settings. The exact contract (file names, line order, which lines appear
when) is docs/contracts.md, "CreateVm, RemoveVm, CVMInfo".

Upstream wrote the request's values as they came; a value with a line break could then add
lines of its own choosing to the agent's environment (AGENT_CVM_ID among them), and a kernel
parameter with a space could add parameters. Both are refused here, naming the field.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from cocos_manager.agent.manifest import parse_ttl
from cocos_manager.config import Settings
from cocos_manager.errors import InvalidArgumentError
from cocos_manager.proto import manager_pb2 as pb

ENVIRONMENT_FILE = "environment"
CERTS_MOUNT = "/etc/certs"  # where the guest mounts the certs share (upstream's path)
KBC_PARAMETER = "agent.aa_kbc_params"
# x86's COMMAND_LINE_SIZE: Linux cuts a longer command line (the tail, our parameter, lost).
KERNEL_CMDLINE_MAX = 2047

# (request field, file in the certs share, variable naming it in the environment)
CERTS = (
    ("agent_cvm_client_cert", "cert.pem", "AGENT_CVM_GRPC_CLIENT_CERT"),
    ("agent_cvm_client_key", "key.pem", "AGENT_CVM_GRPC_CLIENT_KEY"),
    ("agent_cvm_server_ca_cert", "ca.pem", "AGENT_CVM_GRPC_SERVER_CA_CERTS"),
)
# Always written (empty when the request has none), in this order.
ALWAYS = (
    ("AGENT_LOG_LEVEL", "agent_log_level"),
    ("AGENT_CVM_GRPC_URL", "agent_cvm_server_url"),
    ("AGENT_CVM_ID", None),  # the cvm_id
    ("AGENT_CERTS_TOKEN", "agent_certs_token"),
    ("AGENT_CVM_CA_URL", "agent_cvm_ca_url"),
)
# Written when set, after the certificates' lines, in this order.
WHEN_SET = (
    ("AWS_ACCESS_KEY_ID", "aws_access_key_id"),
    ("AWS_SECRET_ACCESS_KEY", "aws_secret_access_key"),
    ("AWS_ENDPOINT_URL", "aws_endpoint_url"),
    ("AWS_REGION", "aws_region"),
)


@dataclass(frozen=True)
class AgentSettings:
    """What a CreateVm'd VM's agent is handed. Holds secrets (keys, tokens): never logged,
    never in the VM record; repr() names only the files."""

    environment: bytes = field(repr=False)
    certs: dict[str, bytes] = field(repr=False)
    kernel_parameter: str  # "" = none

    def __repr__(self) -> str:
        return (
            f"AgentSettings(certs={sorted(self.certs)}, kernel_parameter={self.kernel_parameter!r})"
        )


def _check_line(name: str, value: str) -> None:
    """One line of systemd's EnvironmentFile=: no line break; no trailing backslash, which
    joins the next line (AGENT_CVM_ID's, say) into this value; no leading quote, which opens
    a quoted value that runs on across the following lines to the next such quote."""
    if any(ch in value for ch in "\n\r\0"):
        raise InvalidArgumentError(
            f"{name}: line breaks and NUL are not allowed (each setting is one line of the "
            "agent's environment file)"
        )
    if value[:1] in ("'", '"'):
        raise InvalidArgumentError(
            f"{name}: a leading quote is not allowed (the agent's environment file would read "
            "it as the start of a quoted value running on across the following lines)"
        )
    if value.endswith("\\"):
        raise InvalidArgumentError(
            f"{name}: a trailing backslash is not allowed (it would join the next line of the "
            "agent's environment file to this value)"
        )


def _kernel_parameter(value: str) -> str:
    """`aa_kbs_params` as one kernel parameter: no blank, quote or control character could
    end it and start another."""
    if not value:
        return ""
    if any(ch.isspace() or ch in "\"'\\" or ord(ch) < 0x20 or ord(ch) == 0x7F for ch in value):
        raise InvalidArgumentError(
            "aa_kbs_params: blanks, quotes, backslashes and control characters are not allowed "
            f"(the value becomes the one kernel parameter {KBC_PARAMETER}=...)"
        )
    return f"{KBC_PARAMETER}={value}"


def create_ttl(request: pb.CreateReq, settings: Settings) -> float | None:
    """The VM's TTL in seconds: its own `ttl` (a Go duration, as cocos-cli sends
    Duration.String()), else MANAGER_DEFAULT_TTL; None = no TTL. Checked before anything is
    reserved or started: upstream started the VM and kept it running on a bad TTL."""
    if request.ttl:
        return parse_ttl(request.ttl)
    return settings.service.DEFAULT_TTL


def agent_settings(request: pb.CreateReq, cvm_id: str, kernel_cmdline: str) -> AgentSettings:
    """The environment file, certificates and kernel parameter of one VM; INVALID_ARGUMENT
    naming the field for what the agent could not be handed safely. `kernel_cmdline` is the
    line the parameter is appended to (its length is bounded)."""
    lines: list[tuple[str, str]] = []
    for variable, name in ALWAYS:
        value = cvm_id if name is None else str(getattr(request, name))
        if name is not None:
            _check_line(name, value)
        lines.append((variable, value))
    certs: dict[str, bytes] = {}
    for name, file_name, variable in CERTS:
        data = getattr(request, name)
        if data:  # as upstream: named in the environment only when given
            certs[file_name] = bytes(data)
            lines.append((variable, f"{CERTS_MOUNT}/{file_name}"))
    for variable, name in WHEN_SET:
        value = str(getattr(request, name))
        _check_line(name, value)
        if value:
            lines.append((variable, value))
    parameter = _kernel_parameter(request.aa_kbs_params)
    if parameter and len(kernel_cmdline) + 1 + len(parameter) > KERNEL_CMDLINE_MAX:
        raise InvalidArgumentError(
            f"aa_kbs_params: the kernel command line would exceed {KERNEL_CMDLINE_MAX} "
            "characters, and Linux would cut it"
        )
    environment = "".join(f"{variable}={value}\n" for variable, value in lines).encode()
    return AgentSettings(environment=environment, certs=certs, kernel_parameter=parameter)
