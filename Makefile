# bootenv: the two commands a new user needs are `make demo` and `make test`.
# Each installs what it needs (Debian packages, a venv in .venv) by itself.

SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
# Bytecode is kept, even where PYTHONDONTWRITEBYTECODE is set: pytest would otherwise rewrite
# and compile every test module and bootenv again on each run (5-8 s of collecting the tests here).
PYTEST := PYTHONDONTWRITEBYTECODE= $(PY) -m pytest
APT_PACKAGES := nginx-light python3 python3-venv python3-pip python3-parted python3-pyudev python3-zstandard \
	python3-requests python3-cffi-backend e2fsprogs tar zstd cpio debootstrap kexec-tools \
	busybox-static qemu-system-x86 qemu-utils ipxe-qemu ovmf dosfstools util-linux \
	grub-pc-bin grub-efi-amd64-bin grub2-common mtools parted python3-cryptography fdisk time

.PHONY: deps check test lint unit slow root vm demo bench clean initramfs

deps: $(VENV)/.stamp

$(VENV)/.stamp: pyproject.toml Makefile
	@missing=$$(for p in $(APT_PACKAGES); do dpkg-query -W -f='$${Status}\n' $$p 2>/dev/null | grep -q '^install ok installed' || echo $$p; done); \
	if [ -n "$$missing" ]; then \
	  echo "Installing Debian packages: $$missing"; \
	  if [ "$$(id -u)" != 0 ]; then echo "make deps: run as root to install: $$missing" >&2; exit 1; fi; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $$missing; \
	fi
	# System site packages give the venv Debian's pyparted, pyudev, zstandard and requests.
	test -x $(PY) || /usr/bin/python3 -m venv --system-site-packages $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check --no-deps -e .
	$(PY) -m pip install -q --disable-pip-version-check 'pytest>=7' 'hypothesis>=6' 'ruff>=0.4' 'mypy>=1.8'
	touch $@

lint: deps
	$(PY) -m ruff format --check bootenv tests bench
	$(PY) -m ruff check bootenv tests bench
	$(PY) -m mypy --strict

unit: deps
	$(PYTEST) -q -m "not root and not vm and not slow"

# The fast tier: lint, types and the unit, fault and hostile-input tests but the slow ones.
check: lint unit

# The unit tier's slow tests (load, network faults and resumes in layout, kill -9 at random
# points, archive fuzzing), on their own.
slow: deps
	$(PYTEST) -q -m "slow and not root and not vm"

# Everything: lint, unit (slow tests too), root (loop devices, debootstrap) and vm (QEMU) tiers.
test: lint
	BOOTENV_FUZZ=thorough $(PYTEST) -q

root: deps
	$(PYTEST) -q -m root

vm: deps
	$(PYTEST) -q -m vm

# The main job: netboot a QEMU VM through iPXE and provision it from a captured LAMP image.
# Override the combination with e.g. `make demo COMPONENTS=apache,php` (or mysql, all, none);
# `make demo SINGLE=1` writes the classic one-piece image (every component) instead.
COMPONENTS ?= all
FIRMWARE ?= bios
demo: deps
	$(PY) -m bootenv.demo --components $(COMPONENTS) --firmware $(FIRMWARE) $(if $(SINGLE),--single)

# Benchmarks: ratios measured side by side in one run (not part of `make test`).
# bootenv's bytecode is compiled first, as an installed package's is: PYTHONDONTWRITEBYTECODE
# would otherwise have every bootenv process compile its modules again (0.12 s a start here).
bench: deps
	$(PY) -m pip install -q --disable-pip-version-check matplotlib
	$(PY) -m compileall -q bootenv
	$(PY) -m bench.run $(BENCH_ARGS)

# The netboot ramdisk (vmlinuz + initramfs.img) in build/ramdisk, cached by its inputs.
initramfs: deps
	$(PY) -m bootenv build-ramdisk -o build/ramdisk

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache build *.egg-info
