"""ptagent replies held to guest/PROTOCOL.md: the documented shapes pass, every other shape is
one AgentProtocolError naming the command and the reply. (The real agent's replies are checked
against the same shapes in test_image_agent.py.)"""

from __future__ import annotations

import json

import pytest
from ptharness import agent_reply
from ptharness.agent_reply import check_reply, parse_reply
from ptharness.errors import AgentError, AgentProtocolError

INFO = {
    "uname": {"sysname": "Linux", "release": "6.1.0-57-amd64", "version": "#1 SMP",
              "machine": "x86_64", "nodename": "ptlab"},
    "page_size": 4096,
    "cmdline": "console=ttyS0",
    "vmcoreinfo": {"paddr": 0x4BC1000, "size": 0x1024},
    "kallsyms_visible": True,
    "kallsyms": {"_text": 0xFFFFFFFF81000000, "page_offset_base": 0xFFFFFFFF82A1C118},
    "kvars": {"page_offset_base": 0xFFFF888000000000},
    "system_ram": [{"start": 0x100000, "end": 0x3FFE0000}, {"start": 0x1000, "end": 0x9FC00}],
}
SECRET = {"id": 1, "kind": "secretmem", "va": 0x7F0000000000, "pages": 2, "prot": "rw-",
          "pfns": [0x1234, None]}


def run(args, reply, status=0):
    return parse_reply(args, status, json.dumps(reply) + "\n", "")


def test_documented_replies_pass():
    assert run(["info"], INFO) == INFO
    assert run(["secretmem", "2"], SECRET) == SECRET
    assert run(["kread", "1", "2"], {"va": 1, "hex": "00ff"})["hex"] == "00ff"
    blocks = {"block_size": 1 << 27, "blocks": [
        {"id": 0, "start": 0, "state": "online", "removable": False, "zones": "DMA32"},
        {"id": 8, "start": 1 << 30, "state": "offline"}]}  # removable/zones are optional
    assert run(["memblocks"], blocks) == blocks
    assert run(["ping"], {"pong": True, "pid": 77, "objects": 0, "uptime_s": 3})["pid"] == 77
    assert run(["release", "all"], {"released": [1, 2]}) == {"released": [1, 2]}


def test_info_fields():
    assert agent_reply.kallsyms(INFO)["_text"] == 0xFFFFFFFF81000000
    assert agent_reply.system_ram(INFO) == [(0x1000, 0x9FC00), (0x100000, 0x3FFE0000)]
    assert agent_reply.vmcoreinfo_location(INFO) == (0x4BC1000, 0x1024)
    assert agent_reply.vmcoreinfo_location({**INFO, "vmcoreinfo": None}) is None


def test_error_object_is_agent_error():
    with pytest.raises(AgentError) as e:
        run(["secretmem", "16"], {"error": "memfd_secret: Function not implemented",
                                  "errno": 38}, status=1)
    assert e.value.errno == 38 and "memfd_secret" in e.value.msg


# The alternative shapes the harness used to tolerate, and other undocumented replies.
@pytest.mark.parametrize("args,reply,status,problem", [
    (["info"], {**{k: v for k, v in INFO.items() if k != "kallsyms"},
                "symbols": INFO["kallsyms"]}, 0, r"missing \['kallsyms'\]; unexpected"),
    (["info"], {**{k: v for k, v in INFO.items() if k != "kallsyms"},
                "syms": INFO["kallsyms"]}, 0, r"unexpected \['syms'\]"),
    (["info"], {**{k: v for k, v in INFO.items() if k != "system_ram"},
                "iomem": ["00001000-0009fbff : System RAM"]}, 0, r"missing \['system_ram'\]"),
    (["info"], {**INFO, "ram": []}, 0, r"unexpected \['ram'\]"),
    (["info"], {**INFO, "vmcoreinfo": {"pa": 1, "size": 2}}, 0, r"vmcoreinfo: keys"),
    (["info"], {**INFO, "vmcoreinfo": {"addr": 1, "size": 2}}, 0, r"vmcoreinfo: keys"),
    (["info"], {**INFO, "vmcoreinfo": "4bc1000 1024"}, 0, r"vmcoreinfo: '4bc1000 1024' is not"),
    (["info"], {**INFO, "kallsyms": {"_text": "ffffffff81000000"}}, 0,
     r"kallsyms\._text: 'ffffffff81000000' is not an unsigned integer"),
    (["info"], {**INFO, "page_size": True}, 0, r"page_size: True is not an unsigned"),
    (["info"], {**INFO, "system_ram": [{"start": 5, "end": 5}]}, 0, r"not below end"),
    (["secretmem", "2"], {**SECRET, "vas": [1, 2]}, 0, r"unexpected \['vas'\]"),
    (["secretmem", "2"], {k: v for k, v in SECRET.items() if k != "va"} | {"addr": 1}, 0,
     r"missing \['va'\]"),
    (["secretmem", "2"], {**SECRET, "prot": "rwz"}, 0, r"prot: 'rwz' is not one of"),
    (["secretmem", "2"], {**SECRET, "pfns": [-1]}, 0, r"pfns\[0\]: -1"),
    (["secretmem", "2"], {**SECRET, "kind": "mmap"}, 0, r"kind: 'mmap' is not 'secretmem'"),
    (["ping"], {"ok": True}, 0, r"missing"),
    (["ping"], {"pong": 1, "pid": 1, "objects": 0, "uptime_s": 0}, 0, r"pong: 1 is not True"),
    (["kread", "1", "1"], {"va": 1, "hex": "zz"}, 0, r"hex: 'zz' is not hex"),
    (["info"], [1, 2], 0, r"is not an object"),
    (["bogus"], {}, 0, r"no such ptagent command"),
    # errors: only {"error": str, "errno": int} with exit status 1
    (["secretmem", "16"], {"ok": False, "error": {"errno": 1, "msg": "EPERM"}}, 1,
     r"exit status 1 without the error object"),
    (["secretmem", "16"], {"error": "EPERM"}, 1, r"missing \['errno'\]"),
    (["secretmem", "16"], {"error": "EPERM", "errno": 1}, 0, r"error object with exit status 0"),
    (["ping"], {"pong": True, "pid": 1, "objects": 0, "uptime_s": 0}, 1, r"without the error"),
])
def test_undocumented_replies_are_rejected(args, reply, status, problem):
    with pytest.raises(AgentProtocolError, match=problem) as e:
        run(args, reply, status)
    msg = str(e.value)
    assert msg.startswith(f"ptagent {' '.join(args)}: ")  # names the command ...
    assert e.value.command == args and e.value.reply == reply  # ... and carries the reply
    assert "reply " in msg


@pytest.mark.parametrize("status,out,problem", [
    (0, "", r"exit status 0, 0 stdout line"),
    (127, "", r"exit status 127"),                           # sh: ptagent: not found
    (0, 'noise\n{"pong": true}\n', r"2 stdout line"),          # exactly one line
    (0, "not json\n", r"not JSON"),
    (2, '{"error": "x", "errno": 1}\n', r"exit status 2"),
])
def test_bad_output_is_rejected(status, out, problem):
    with pytest.raises(AgentProtocolError, match=problem) as e:
        parse_reply(["ping"], status, out, "sh: ptagent: not found")
    assert str(e.value).startswith("ptagent ping: ")


def test_check_reply_knows_every_documented_command():
    documented = {"info", "kread", "secretmem", "mmap", "mprotect", "canary", "release", "list",
                  "ping", "pin", "memblocks", "online", "offline", "insmod", "rmmod", "serve"}
    assert set(agent_reply.REPLIES) == documented
    check_reply("insmod", {"loaded": "/lib/modules/x.ko"})
    with pytest.raises(AgentProtocolError, match="insmod"):
        check_reply("insmod", {"loaded": 1})
    check_reply("rmmod", {"removed": "qemu_fw_cfg"})
    with pytest.raises(AgentProtocolError, match="rmmod"):
        check_reply("rmmod", {"removed": "x", "loaded": "x"})
