"""Config fragments: parsing, validation against a (tiny, fake) Kconfig tree, merge, verify."""

from pathlib import Path

import pytest

from apflab.errors import UsageError
from apflab.kernel import fragments
from apflab.kernel.builder import version_layers
from apflab.kernel.fragments import Setting


def test_parse_accepts_every_config_line_form() -> None:
    text = "\n".join(
        [
            "# a comment",
            "",
            "CONFIG_KVM_GUEST=y",
            "CONFIG_IPV6=n",
            'CONFIG_LOCALVERSION="-apflab"',
            'CONFIG_CMDLINE="a \\"quoted\\" word"',
            "CONFIG_NR_CPUS=64",
            "CONFIG_PHYSICAL_START=0x1000000",
            "CONFIG_LOG_CPU_MAX_BUF_SHIFT=-1",
            "# CONFIG_VT is not set",
            "  CONFIG_SMP=y  ",
        ]
    )
    got = [(s.symbol, s.value) for s in fragments.parse_fragment(text, "f.config")]
    assert got == [
        ("KVM_GUEST", "y"),
        ("IPV6", "n"),
        ("LOCALVERSION", '"-apflab"'),
        ("CMDLINE", '"a \\"quoted\\" word"'),
        ("NR_CPUS", "64"),
        ("PHYSICAL_START", "0x1000000"),
        ("LOG_CPU_MAX_BUF_SHIFT", "-1"),
        ("VT", "n"),
        ("SMP", "y"),
    ]


def test_parse_names_file_and_line_of_a_bad_line() -> None:
    with pytest.raises(UsageError, match=r"f\.config:2: 'KVM_GUEST=y' is not a config line"):
        fragments.parse_fragment("CONFIG_SMP=y\nKVM_GUEST=y\n", "f.config")


@pytest.mark.parametrize(
    "line",
    ["CONFIG_SMP=yes", "CONFIG_SMP = y", 'CONFIG_X="unterminated', "CONFIG_=y", "CONFIG_SMP"],
)
def test_parse_refuses_malformed_values(line: str) -> None:
    with pytest.raises(UsageError, match="is not a config line"):
        fragments.parse_fragment(line, "f.config")


def test_parse_refuses_modules() -> None:
    with pytest.raises(UsageError, match=r"f\.config:1: CONFIG_VIRTIO_BLK=m .*without modules"):
        fragments.parse_fragment("CONFIG_VIRTIO_BLK=m\n", "f.config")


def _fake_tree(root: Path) -> Path:
    (root / "arch" / "x86").mkdir(parents=True)
    (root / "Kconfig").write_text('mainmenu "x"\nsource "arch/x86/Kconfig"\nconfig SMP\n\tbool\n')
    (root / "arch" / "x86" / "Kconfig").write_text(
        "menuconfig HYPERVISOR_GUEST\n\tbool\nif HYPERVISOR_GUEST\n  config KVM_GUEST\n"
        '\tbool "KVM"\nendif\n# config NOT_A_SYMBOL\n'
    )
    (root / "arch" / "x86" / "Kconfig.debug").write_text("config X86_MSR\n\ttristate\n")
    hidden = root / ".git"
    hidden.mkdir()
    (hidden / "Kconfig").write_text("config FROM_GIT_DIR\n")
    return root


def test_kconfig_scan_finds_config_and_menuconfig(tmp_path: Path) -> None:
    symbols = fragments.kconfig_symbols(_fake_tree(tmp_path))
    assert symbols == {"SMP", "HYPERVISOR_GUEST", "KVM_GUEST", "X86_MSR"}


def test_unknown_symbol_is_refused_with_a_suggestion(tmp_path: Path) -> None:
    known = fragments.kconfig_symbols(_fake_tree(tmp_path))
    settings = fragments.parse_fragment("CONFIG_SMP=y\nCONFIG_KVM_GEUST=y\n", "g.config")
    with pytest.raises(UsageError) as err:
        fragments.check_symbols(settings, known, "debian-6.1 (6.1.192-3)")
    message = str(err.value)
    assert "g.config:2: CONFIG_KVM_GEUST is not a Kconfig symbol of debian-6.1" in message
    assert "did you mean CONFIG_KVM_GUEST?" in message
    assert "\n" not in message


def test_known_symbols_pass(tmp_path: Path) -> None:
    known = fragments.kconfig_symbols(_fake_tree(tmp_path))
    fragments.check_symbols(fragments.parse_fragment("# CONFIG_SMP is not set", "h"), known, "s")


def test_symbols_added_by_a_patch() -> None:
    patch = "+config APFLAB_NEW\n+\tbool\n+menuconfig APFLAB_MENU\n config OLD_CONTEXT\n"
    assert fragments.symbols_added_by_patch(patch) == {"APFLAB_NEW", "APFLAB_MENU"}


def test_merge_replaces_and_later_settings_win() -> None:
    config = "CONFIG_A=y\n# CONFIG_B is not set\nCONFIG_C=y\n# comment kept\n"
    settings = [
        Setting("B", "y", "f:1"),
        Setting("C", "n", "f:2"),
        Setting("D", '"x"', "f:3"),
        Setting("B", "n", "g:1"),
    ]
    merged = fragments.merge(config, settings)
    assert merged.splitlines() == [
        "CONFIG_A=y",
        "# comment kept",
        "# CONFIG_C is not set",
        'CONFIG_D="x"',
        "# CONFIG_B is not set",
    ]


def test_unmet_reports_values_that_did_not_take() -> None:
    final = "CONFIG_A=y\n# CONFIG_B is not set\nCONFIG_N=0x40\n"
    settings = [
        Setting("A", "y", "f:1"),
        Setting("B", "y", "f:2"),  # dependency missing
        Setting("GONE", "n", "f:3"),  # absent counts as not set
        Setting("GONE2", "y", "f:4"),  # absent: did not take
        Setting("N", "64", "f:5"),  # 0x40 == 64
    ]
    assert [(s.symbol, got) for s, got in fragments.unmet(settings, final)] == [
        ("B", "n"),
        ("GONE2", None),
    ]


def test_version_layers_apply_on_their_side_of_the_version(tmp_path: Path) -> None:
    names = ("base.config", "since-6.2.config", "since-6.10.config", "before-6.9.config")
    for name in (*names, "since-x.config", "other-6.1.config"):
        (tmp_path / name).write_text("")
    assert [p.name for p in version_layers(tmp_path, "6.1.192")] == ["before-6.9.config"]
    assert [p.name for p in version_layers(tmp_path, "6.12.117")] == [
        "since-6.2.config",
        "since-6.10.config",
    ]
    assert [p.name for p in version_layers(tmp_path, "6.9-rc1")] == ["since-6.2.config"]


def test_project_base_config_parses() -> None:
    base = Path(__file__).parents[2] / "guest_images" / "kernel" / "config"
    for path in sorted(base.glob("*.config")):
        settings = fragments.parse_fragment(path.read_text(), str(path))
        assert settings, path
        assert all(s.value != "m" for s in settings)
