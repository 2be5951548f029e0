"""Roles as groups: admin, operator, viewer; staff are admins; the old group is renamed."""

from __future__ import annotations

import importlib

import pytest
from django.apps import apps
from django.contrib.auth.models import Group, User

from registry.permissions import ROLE_GROUPS, is_admin, is_operator, role_of

pytestmark = pytest.mark.django_db

role_migration = importlib.import_module("registry.migrations.0002_role_groups")


def user_in(username: str, group: str | None = None, **fields) -> User:
    user = User.objects.create_user(username=username, **fields)
    if group:
        user.groups.add(Group.objects.get_or_create(name=group)[0])
    return User.objects.get(pk=user.pk)  # fresh: no cached role


def test_the_migration_created_the_three_groups():
    assert set(Group.objects.values_list("name", flat=True)) >= set(ROLE_GROUPS)


def test_roles_from_groups_and_staff():
    assert role_of(user_in("s", is_staff=True)) == "admin"
    assert role_of(user_in("a", "admin")) == "admin"
    assert role_of(user_in("o", "operator")) == "operator"
    assert role_of(user_in("v", "viewer")) == "viewer"
    assert role_of(user_in("plain")) == "viewer"
    assert role_of(user_in("gone", "operator", is_active=False)) is None
    assert is_operator(user_in("a2", "admin")) and not is_admin(user_in("o2", "operator"))
    assert not is_operator(user_in("v2", "viewer"))


def test_the_old_operators_group_is_renamed_with_its_members():
    Group.objects.filter(name="operator").delete()
    member = user_in("old", "operators")
    role_migration.forwards(apps, None)
    assert not Group.objects.filter(name="operators").exists()
    assert role_of(User.objects.get(pk=member.pk)) == "operator"


def test_members_of_both_names_are_merged():
    both = user_in("both", "operators")
    other = user_in("other", "operator")
    role_migration.forwards(apps, None)
    assert not Group.objects.filter(name="operators").exists()
    assert set(Group.objects.get(name="operator").user_set.values_list("pk", flat=True)) == {
        both.pk, other.pk}
