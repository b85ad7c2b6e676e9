"""A component's units: the ones its .wants, .requires, .upholds and SysV start links enable."""

from __future__ import annotations

from pathlib import Path

from bootenv.activate import not_enabled
from bootenv.units import enabled_units

TREE = (
    "/usr/lib/systemd/system/mariadb.service",
    "/lib/systemd/system/apache2.service",
    "/etc/systemd/system/masked.service",  # a link to /dev/null: a native unit all the same
    "/etc/init.d/mariadb",
    "/etc/init.d/apache2",
    "/etc/init.d/masked",
    "/etc/init.d/legacyd",
    "/etc/init.d/stopper",
)


def test_wants_and_requires_links_enable_their_units() -> None:
    files = [
        "/etc/systemd/system/multi-user.target.wants/mariadb.service",
        "/etc/systemd/system/multi-user.target.requires/apache2.service",
        "/etc/systemd/system/sockets.target.wants/db.socket",
        "/etc/systemd/system/getty.target.wants/getty@tty1.service",
        "/etc/systemd/system/mariadb.service.d/override.conf",  # a drop-in, not a link
        "/etc/systemd/system/a.wants/deeper/x.service",
        "/etc/systemd/user/default.target.wants/u.service",  # a user's unit, not the system's
    ]
    assert enabled_units(files, TREE) == (
        "apache2.service",
        "db.socket",
        "getty@tty1.service",
        "mariadb.service",
    )


def test_an_init_script_started_in_a_runlevel_is_its_generated_service() -> None:
    files = ["/etc/init.d/legacyd", "/etc/rc2.d/S01legacyd", "/etc/rc3.d/S01legacyd", "/etc/rc0.d/K01legacyd"]
    assert enabled_units(files, TREE) == ("legacyd.service",)


def test_a_start_link_enables_nothing_more_where_a_native_unit_has_the_name() -> None:
    files = ["/etc/rc2.d/S01mariadb", "/etc/rc5.d/S02apache2", "/etc/rc2.d/S01masked"]
    assert enabled_units(files, TREE) == ()
    wants = "/etc/systemd/system/multi-user.target.wants/mariadb.service"
    assert enabled_units([*files, wants], TREE) == ("mariadb.service",)


def test_links_that_start_nothing_are_not_units() -> None:
    files = [
        "/etc/rc0.d/S01stopper",  # halt and reboot: the generator starts nothing there
        "/etc/rc6.d/S01stopper",
        "/etc/rc2.d/K01legacyd",
        "/etc/rc2.d/S1legacyd",  # not two digits
        "/etc/rc2.d/S01nosuchscript",  # no init script
        "/etc/rc2.d/README",
    ]
    assert enabled_units(files, TREE) == ()


def test_upholds_links_enable_their_units() -> None:
    """systemd 249's `UpheldBy=`: `systemctl enable` links the unit into the upholder's
    .upholds/ directory, and systemd then keeps it running."""
    files = [
        "/etc/systemd/system/multi-user.target.upholds/watchdogd.service",
        "/etc/systemd/system/app.service.upholds/app-helper.service",
        "/etc/systemd/system/a.upholds.d/x.service",  # not an .upholds directory
    ]
    assert enabled_units(files, TREE) == ("app-helper.service", "watchdogd.service")


def test_an_upholds_link_in_place_is_the_units_enablement(tmp_path: Path) -> None:
    """Activation enables only a unit with no link: one the component brought in an
    .upholds/ directory is not `systemctl enable`d again."""
    upholds = tmp_path / "etc/systemd/system/multi-user.target.upholds"
    upholds.mkdir(parents=True)
    (upholds / "watchdogd.service").symlink_to("/lib/systemd/system/watchdogd.service")
    assert not_enabled(tmp_path, ["watchdogd.service", "other.service"]) == ["other.service"]
