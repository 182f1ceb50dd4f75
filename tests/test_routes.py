"""Which interface each hop takes (pipeline/place/routes.py): the parsers over sample outputs
of Linux's `ip route get`, macOS's `route -n get` and `networksetup -listallhardwareports`,
the warnings, and a real route lookup here."""

import shutil

import pytest

from pipeline.place import routes
from pipeline.place.hostfile import parse_hostfile_text
from pipeline.place.routes import HopRoute

IP_ROUTE_GET = {
    "192.168.1.20 dev eth0 src 192.168.1.5 uid 1000 \n    cache \n": "eth0",
    "8.8.8.8 via 10.0.0.1 dev wlp2s0 src 10.0.0.23 uid 1000 \n    cache \n": "wlp2s0",
    "local 127.0.0.1 dev lo table local src 127.0.0.1 uid 0 \n    cache <local> \n": "lo",
    "RTNETLINK answers: Network is unreachable\n": None,
}

# macOS 15, a MacBook Pro: the Thunderbolt bridge and the Wi-Fi both on 192.168.1.x
ROUTE_GET_BRIDGE = """\
   route to: 192.168.1.30
destination: 192.168.1.0
       mask: 255.255.255.0
  interface: bridge0
      flags: <UP,DONE,CLONING>
 recvpipe  sendpipe  ssthresh  rtt,msec    rttvar  hopcount      mtu     expire
       0         0         0         0         0         0      1500         0
"""
ROUTE_GET_WIFI = """\
   route to: 192.168.1.20
destination: default
       mask: default
    gateway: 192.168.1.254
  interface: en0
      flags: <UP,GATEWAY,DONE,STATIC,PRCLONING,GLOBAL>
 recvpipe  sendpipe  ssthresh  rtt,msec    rttvar  hopcount      mtu     expire
       0         0         0         0         0         0      1500         0
"""
HARDWARE_PORTS = """
Hardware Port: Wi-Fi
Device: en0
Ethernet Address: 3c:22:fb:00:00:01

Hardware Port: Thunderbolt Bridge
Device: bridge0
Ethernet Address: 36:29:40:00:00:02

Hardware Port: Thunderbolt 1
Device: en1
Ethernet Address: 36:29:40:00:00:03

Hardware Port: USB 10/100/1000 LAN
Device: en5
Ethernet Address: 00:e0:4c:00:00:04

VLAN Configurations
===================
"""


@pytest.mark.parametrize("text, iface", IP_ROUTE_GET.items())
def test_parse_ip_route_get(text, iface):
    assert routes.parse_ip_route_get(text) == iface


def test_parse_route_get():
    assert routes.parse_route_get(ROUTE_GET_BRIDGE) == "bridge0"
    assert routes.parse_route_get(ROUTE_GET_WIFI) == "en0"
    assert routes.parse_route_get("route: writing to routing socket: not in table\n") is None


def test_parse_hardware_ports():
    ports = routes.parse_hardware_ports(HARDWARE_PORTS)
    assert ports == {"en0": "Wi-Fi", "bridge0": "Thunderbolt Bridge", "en1": "Thunderbolt 1",
                     "en5": "USB 10/100/1000 LAN"}
    assert [d for d, p in ports.items() if routes.is_wifi_port(p)] == ["en0"]
    assert routes.is_wifi_port("AirPort") and not routes.is_wifi_port(None)


def test_linux_wireless_interfaces(tmp_path):
    (tmp_path / "wlp2s0" / "wireless").mkdir(parents=True)
    (tmp_path / "eth0").mkdir()
    assert routes.linux_port("wlp2s0", tmp_path) == "Wi-Fi"
    assert routes.linux_port("eth0", tmp_path) is None


def test_route_command_per_system():
    assert routes.route_command("192.168.1.20", "darwin") == ["route", "-n", "get", "192.168.1.20"]
    assert routes.route_command("192.168.1.20", "linux") == ["ip", "route", "get", "192.168.1.20"]


def hop(src, dst, iface, port=None, **kw):
    host = f"192.168.1.{dst + 1}"
    return HopRoute(src, dst, host, host, iface, port, routes.is_wifi_port(port), **kw)


def test_wifi_hop_is_named():
    warnings = routes.route_warnings([hop(0, 1, "en0", "Wi-Fi"),
                                      hop(1, 0, "bridge0", "Thunderbolt Bridge")])
    assert warnings[0].startswith("link 0 -> 1: the route to 192.168.1.2 goes over en0 (Wi-Fi): "
                                  "if Wi-Fi shares a subnet with the Thunderbolt bridge")
    # and the two hops leave by different interfaces, with nothing declared
    assert warnings[1].startswith("the ring's hops leave by different interfaces "
                                  "(0 -> 1 en0, 1 -> 0 bridge0)")
    assert len(warnings) == 2


def test_declared_interface_checked_per_host():
    entries = parse_hostfile_text("a slots=1 # pipeline: iface=bridge0\n"
                                  "b slots=1 # pipeline: iface=bridge0\n"
                                  "c slots=1 # pipeline: iface=en5 name=\"on the switch\"\n")
    assert [e.iface for e in entries] == ["bridge0", "bridge0", "en5"]
    expected = {i: e.iface for i, e in enumerate(entries)}
    lines = {i: e.line for i, e in enumerate(entries)}
    good = [hop(0, 1, "bridge0", "Thunderbolt Bridge"), hop(1, 2, "en5", "USB LAN"),
            hop(2, 0, "bridge0", "Thunderbolt Bridge")]
    assert routes.route_warnings(good, expected, lines) == []  # mixed, but as declared
    bad = [hop(0, 1, "en0", "Ethernet"), *good[1:]]
    assert routes.route_warnings(bad, expected, lines) == [
        "link 0 -> 1: the route to 192.168.1.2 goes over en0 (Ethernet), but the hostfile says "
        "iface=bridge0 (line 2): is another interface on the same subnet? give the link a "
        "subnet of its own"]


def test_same_host_and_failures():
    same = HopRoute(0, 1, "localhost", local=True)
    assert same.label == "same host" and routes.route_warnings([same], {1: "bridge0"}) == []
    lost = HopRoute(0, 1, "mini.local", error="cannot resolve mini.local: not known")
    assert routes.route_warnings([lost]) == [
        "link 0 -> 1: cannot tell which interface reaches mini.local (cannot resolve "
        "mini.local: not known)"]
    assert routes.route_to(0, 1, "no-such-host.invalid", False).error.startswith(
        "cannot resolve no-such-host.invalid")
    assert routes.route_to(0, 1, "anything", True).local


@pytest.mark.skipif(shutil.which("ip") is None, reason="needs iproute2's ip")
def test_real_route_lookup_here():
    """`ip route get` sends nothing: loopback is local; a benchmark-range address (198.18.0.0/15,
    never routed here) leaves by the default route's interface, or has no route at all."""
    assert routes.route_to(0, 1, "127.0.0.1", False).local
    far = routes.route_to(0, 1, "198.18.0.1", False)
    assert far.address == "198.18.0.1"
    assert (far.iface is not None) != (far.error is not None)
