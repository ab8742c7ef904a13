#!/usr/bin/env python3
"""A deliberately misbehaving MCP server over stdio, for the malformed cases
of troupe_mcp's tests (crates/troupe_mcp/tests/mcp.rs). The well-behaved
cases run against the reference server from npm.

Tools:
  big        answers 1 MiB of text (past the client's result limit)
  hang       never answers
  cancelled  answers how many cancellations arrived (waits for the first)
  fail       answers isError with a message
  garbage    writes a line that is not JSON, then answers
  exit       exits the process without answering
  bad.name   a name no model API accepts (never called)
"""

import json
import os
import sys

# MOCK_ENDLESS=1: tools/list pages on forever, one tool a page.
ENDLESS = os.environ.get("MOCK_ENDLESS") == "1"
# MOCK_DIE=1: writes 1 MiB to standard error without a newline, then a last
# line, and exits before the handshake.
DIE = os.environ.get("MOCK_DIE") == "1"

TOOLS = ["big", "hang", "cancelled", "fail", "garbage", "exit", "bad.name"]
cancellations = 0
waiting_for_cancel = []


def send(message):
    sys.stdout.write(json.dumps(message) + "\n")
    sys.stdout.flush()


def result(id_, value):
    send({"jsonrpc": "2.0", "id": id_, "result": value})


def text(id_, body, error=False):
    value = {"content": [{"type": "text", "text": body}]}
    if error:
        value["isError"] = True
    result(id_, value)


def call(id_, name):
    if name == "big":
        text(id_, "x" * (1024 * 1024))
    elif name == "hang":
        pass
    elif name == "cancelled":
        if cancellations:
            text(id_, f"{cancellations} cancelled")
        else:
            waiting_for_cancel.append(id_)
    elif name == "fail":
        text(id_, "the printer is on fire", error=True)
    elif name == "garbage":
        sys.stdout.write("this is not JSON-RPC {\n")
        text(id_, "after the noise")
    elif name == "exit":
        sys.exit(0)
    else:
        send({"jsonrpc": "2.0", "id": id_, "error": {"code": -32602, "message": f"no tool {name}"}})


if DIE:
    sys.stderr.write("e" * (1024 * 1024))
    sys.stderr.write("\nlast line\n")
    sys.stderr.flush()
    sys.exit(1)

for line in sys.stdin:
    line = line.strip()
    if not line:
        continue
    msg = json.loads(line)
    method = msg.get("method")
    id_ = msg.get("id")
    if method == "initialize":
        result(id_, {
            "protocolVersion": msg["params"]["protocolVersion"],
            "capabilities": {"tools": {"listChanged": False}},
            "serverInfo": {"name": "troupe-mock", "version": "1"},
        })
    elif method == "tools/list" and ENDLESS:
        page = int((msg.get("params") or {}).get("cursor") or "0")
        result(id_, {
            "tools": [{"name": f"t{page}", "inputSchema": {"type": "object"}}],
            "nextCursor": str(page + 1),
        })
    elif method == "tools/list":
        result(id_, {"tools": [
            {"name": n, "description": f"the {n} tool", "inputSchema": {"type": "object"}}
            for n in TOOLS
        ]})
    elif method == "tools/call":
        call(id_, msg["params"]["name"])
    elif method == "ping":
        result(id_, {})
    elif method == "notifications/cancelled":
        cancellations += 1
        for waiting in waiting_for_cancel:
            text(waiting, f"{cancellations} cancelled")
        waiting_for_cancel.clear()
    elif id_ is not None:
        send({"jsonrpc": "2.0", "id": id_, "error": {"code": -32601, "message": f"no method {method}"}})
