"""The project's XLA flags: appended once, never over a user's setting."""

import os

import pytest

from mnist_jax import xla_setup


@pytest.fixture
def env(monkeypatch):
  monkeypatch.delenv(xla_setup.DISABLE_ENV_VAR, raising=False)
  monkeypatch.setattr(xla_setup, '_jaxlib_version', lambda: '0.10.2')
  monkeypatch.setattr(xla_setup, '_backend_already_initialised', lambda: False)
  return monkeypatch


def test_appends_recommended_flags_once(env):
  env.setenv('XLA_FLAGS', '--xla_force_host_platform_device_count=8')
  added = xla_setup.configure()
  assert added == list(xla_setup.CPU_FLAGS)
  flags = os.environ['XLA_FLAGS'].split()
  assert flags[0] == '--xla_force_host_platform_device_count=8'
  assert xla_setup.configure() == []  # idempotent


def test_never_overrides_a_user_flag(env):
  name = xla_setup.CPU_FLAGS[0].split('=')[0]
  env.setenv('XLA_FLAGS', f'{name}=individual_convolution')
  assert xla_setup.configure() == []
  assert os.environ['XLA_FLAGS'] == f'{name}=individual_convolution'


def test_disabled_by_env_and_off_for_other_platforms_or_jaxlibs(env):
  env.setenv('XLA_FLAGS', '')
  env.setenv(xla_setup.DISABLE_ENV_VAR, '1')
  assert xla_setup.configure() == []
  env.delenv(xla_setup.DISABLE_ENV_VAR)
  assert xla_setup.configure(platform_hint='gpu') == []
  env.setattr(xla_setup, '_jaxlib_version', lambda: '0.11.0')
  assert xla_setup.configure() == []  # unvalidated: jaxlib aborts on unknown flags
  assert os.environ['XLA_FLAGS'] == ''


def test_flags_are_active_in_this_process():
  """`import mnist_jax` (conftest) applied them before JAX started."""
  if os.environ.get(xla_setup.DISABLE_ENV_VAR):
    pytest.skip(f'{xla_setup.DISABLE_ENV_VAR} is set')
  version = xla_setup._jaxlib_version()  # pylint: disable=protected-access
  if not version.startswith(xla_setup._VALIDATED_JAXLIB):  # pylint: disable=protected-access
    pytest.skip(f'jaxlib {version}: no flags validated for it')
  present = os.environ.get('XLA_FLAGS', '').split()
  assert xla_setup.CPU_FLAGS
  for flag in xla_setup.CPU_FLAGS:
    name = flag.split('=')[0]
    assert [f for f in present if f.split('=')[0] == name] == [flag]
