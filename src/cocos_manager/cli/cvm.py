"""`cocos-manager-cli create-vm / remove-vm / cvm-info`: today's upstream control plane, with
the flags of upstream's `cocos-cli create-vm` (cli/manager.go), so its users' command lines
work here: certificate and key flags take file paths, whose bytes are sent."""

from __future__ import annotations

import argparse
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any

from google.protobuf import json_format

from cocos_manager.cli.calls import unary
from cocos_manager.cli.request import CliError
from cocos_manager.proto import manager_pb2 as pb

Command = Callable[[argparse.Namespace], Coroutine[Any, Any, int]]


def _file_bytes(flag: str, path: str | None) -> bytes:
    """As upstream's fileReader: no flag, no bytes (the agent's environment then names no file)."""
    if not path:
        return b""
    try:
        return Path(path).read_bytes()
    except OSError as error:
        raise CliError(f"{flag}: cannot read {path!r}: {error.strerror}") from None


def create_request(options: argparse.Namespace) -> pb.CreateReq:
    return pb.CreateReq(
        agent_cvm_server_url=options.server_url or "",
        agent_cvm_server_ca_cert=_file_bytes("--server-ca", options.server_ca),
        agent_cvm_client_key=_file_bytes("--client-key", options.client_key),
        agent_cvm_client_cert=_file_bytes("--client-crt", options.client_crt),
        agent_cvm_ca_url=options.ca_url or "",
        agent_log_level=options.log_level or "",
        ttl=options.ttl or "",
        agent_certs_token=options.certs_token or "",
        aws_access_key_id=options.aws_access_key_id or "",
        aws_secret_access_key=options.aws_secret_access_key or "",
        aws_endpoint_url=options.aws_endpoint_url or "",
        aws_region=options.aws_region or "",
        aa_kbs_params=options.aa_kbs_params or "",
    )


async def create_vm(options: argparse.Namespace) -> int:
    return await unary(
        options,
        lambda stub: stub.CreateVm,
        create_request(options),
        lambda response: (
            f"virtual machine created with id {response.cvm_id} and port {response.forwarded_port}"
        ),
    )


async def remove_vm(options: argparse.Namespace) -> int:
    return await unary(
        options,
        lambda stub: stub.RemoveVm,
        pb.RemoveReq(cvm_id=options.cvm_id),
        lambda _: f"virtual machine {options.cvm_id} removed",
    )


def _cvm_info_text(response: pb.CVMInfoRes) -> str:
    """Without --json: every field, indented, as upstream's cocos-cli prints it."""
    return json_format.MessageToJson(
        response,
        indent=2,
        always_print_fields_with_no_presence=True,
        preserving_proto_field_name=True,
    )


async def cvm_info(options: argparse.Namespace) -> int:
    return await unary(
        options, lambda stub: stub.CVMInfo, pb.CVMInfoReq(id=options.cvm_id), _cvm_info_text
    )


COMMANDS: dict[str, Command] = {
    "create-vm": create_vm,
    "remove-vm": remove_vm,
    "cvm-info": cvm_info,
}


def add_parsers(
    sub: argparse._SubParsersAction[Any],
    common: argparse.ArgumentParser,
    formatter: type[argparse.HelpFormatter],
) -> None:
    create = sub.add_parser(
        "create-vm",
        parents=[common],
        formatter_class=formatter,
        help="create a VM whose agent fetches its work from the CVM server (today's Cocos)",
    )
    create.add_argument("--server-url", required=True, help="CVM server URL (the agent dials it)")
    create.add_argument("--server-ca", help="CVM server CA certificate file")
    create.add_argument("--client-key", help="the agent's client key file for the CVM server")
    create.add_argument("--client-crt", help="the agent's client certificate file")
    create.add_argument("--ca-url", help="CVM CA service URL")
    create.add_argument("--log-level", help="the agent's log level")
    create.add_argument("--ttl", help="remove the VM this long after it runs (Go duration: 30m0s)")
    create.add_argument("--certs-token", help="AGENT_CERTS_TOKEN for the CA service")
    create.add_argument("--aws-access-key-id", help="AWS access key id (S3/MinIO)")
    create.add_argument("--aws-secret-access-key", help="AWS secret access key")
    create.add_argument("--aws-endpoint-url", help="AWS endpoint URL (MinIO, S3)")
    create.add_argument("--aws-region", help="AWS region")
    create.add_argument(
        "--aa-kbs-params",
        help="attestation agent KBS parameters (kernel parameter agent.aa_kbc_params)",
    )
    remove = sub.add_parser(
        "remove-vm", parents=[common], formatter_class=formatter, help="remove a VM (as stop)"
    )
    remove.add_argument("cvm_id")
    info = sub.add_parser(
        "cvm-info",
        parents=[common],
        formatter_class=formatter,
        help="a VM's CPUs, CPU model, kernel command line, OVMF and EOS versions",
    )
    info.add_argument("cvm_id")
