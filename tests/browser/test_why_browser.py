"""In Chromium (issue 15): pages that say why, the scale/policy interplay, chart gaps, the
registry at scale, the 404 page, and every page at 390 px without sideways scrolling.

Screenshots of each page go to $SWARM_TEST_ARTEFACTS (else var/test-artifacts/why); the
folder is printed, for CI to keep.
"""

from __future__ import annotations

import pytest

from dashboards import history
from registry.models import Model
from scaling import services as scaling
from serving import services
from serving.models import Replica
from tests import factories

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.slow]
GIB = 1024**3
PHONE = {"width": 390, "height": 844}
PAGES = ("/overview/", "/fleet/", "/deployments/", "/deployments/mlp/", "/models/",
         "/models/mlp/", "/access/", "/playground/", "/no-such-page/")


def deploy(model, operator, model_files, **settings_):
    factories.add_version(model, operator, model_files["torchscript"])
    return services.do_create_deployment(name="mlp", model=model, version_number=1,
                                         alias_name="", user=operator, **settings_)


def test_a_pending_replica_shows_why_on_its_row(log_in, operator, model, model_files, gpu_node,
                                                screenshot):
    deploy(model, operator, model_files, replicas=1, memory_bytes=900 * GIB)
    page = log_in("olga")
    page.goto("/deployments/mlp/")
    why = page.locator('#replicas td[data-field="why"]')
    assert why.inner_text() == ("no node has 900 GiB of memory on one device: the largest "
                                "has 80 GiB")
    assert "why" in why.get_attribute("class")
    screenshot(page, "pending-reason")
    page.goto("/deployments/")
    row = page.locator("#deployments tr[data-deployment]")
    assert row.get_attribute("data-health") in ("ok", "warn")  # pending only just now
    screenshot(page, "deployments-list")


def test_scaling_by_hand_pauses_the_policy_and_says_so(log_in, operator, model, model_files,
                                                       gpu_node, screenshot):
    deployment = deploy(model, operator, model_files, replicas=1, memory_bytes=GIB)
    scaling.do_set_policy(deployment, min_replicas=1, max_replicas=4)
    page = log_in("olga")
    page.goto("/deployments/mlp/")
    note = page.locator("#scale-policy-note")
    assert "pauses the auto-scaler" in note.inner_text()
    screenshot(page, "before")
    page.fill("#scale-form input[name=replicas]", "3")
    page.click("#scale-form button[type=submit]")
    page.wait_for_selector("text=The auto-scaler is paused")
    assert "paused" in page.locator("#policy-state").inner_text()
    assert page.locator("#scale-form button[type=submit]").inner_text() == "Scale"
    assert "scaled to 3 by hand (auto-scaler paused)" in page.locator("#revisions").inner_text()
    screenshot(page, "after")


def test_a_stretch_without_data_is_a_gap_in_the_chart(log_in, operator, model, model_files,
                                                      gpu_node, screenshot):
    deploy(model, operator, model_files, replicas=1, memory_bytes=GIB)
    replica_id = Replica.objects.get().pk
    devices = [{"index": 0, "utilization_pct": 50.0}]
    start_s = 1_800_000_000.0
    for step, at_s in enumerate((0, 5, 10, 310, 315, 320)):  # five minutes without data
        history.record(gpu_node.pk, start_s + at_s, devices, [
            {"replica_id": replica_id, "completed": 10 * step, "failed": 0,
             "latency_p50_ms": 2.0, "latency_p99_ms": 5.0}])
    page = log_in("olga")
    page.goto("/deployments/mlp/")
    page.wait_for_selector("#chart-rps .u-over")
    data = page.evaluate("document.getElementById('chart-rps').swarmChart.data")
    times, rps = data[0], data[1]
    gap = rps.index(None)
    assert times[gap - 1] < start_s + 100 < start_s + 300 < times[gap + 1]
    assert all(value is not None for value in rps[gap + 1:])
    labels = page.locator("#chart-latency .u-legend").inner_text()
    assert "p50 (ms)" in labels and "errors (%)" in labels
    screenshot(page, "gap")


def test_the_registry_searches_and_pages_200_models(log_in, operator, screenshot):
    Model.objects.bulk_create([
        Model(name=f"model-{i:03d}", owner=operator,
              description="a resnet for images" if i % 10 == 0 else "text")
        for i in range(200)])
    page = log_in("olga")
    page.goto("/models/")
    assert page.locator("#models tbody tr").count() == 25
    assert "page 1 of 8" in page.locator("#model-count").inner_text()
    page.click("text=Next →")
    page.wait_for_url("**/models/?page=2")
    assert page.locator("#models tbody tr").first.inner_text().startswith("model-025")
    page.fill("input[name=q]", "resnet")
    page.click("#model-search button[type=submit]")
    page.wait_for_url("**/models/?q=resnet")
    assert page.locator("#models tbody tr").count() == 20
    screenshot(page, "search")
    height = page.evaluate("document.documentElement.scrollHeight")
    assert height < 3100  # 82 models made a 3,100 px page; 200 now make pages of 25


def test_a_missing_page_is_a_styled_404_with_a_way_back(log_in, operator, screenshot):
    page = log_in("olga")
    response = page.goto("/deployments/nothing-here/")
    assert response.status == 404
    assert page.locator("#error-page h1").inner_text() == "Nothing here"
    page.click('#error-page nav a[href="/deployments/"]')
    page.wait_for_url("**/deployments/")
    assert page.locator('nav a[aria-current="page"]').inner_text() == "Deployments"
    screenshot(page, "404")


def test_every_page_fits_a_390_px_phone_without_sideways_scrolling(
        log_in, operator, model, model_files, gpu_node, screenshot):
    deploy(model, operator, model_files, replicas=1, memory_bytes=GIB)
    page = log_in("olga", viewport=PHONE)
    too_wide = {}
    for path in PAGES:
        page.goto(path)
        page.wait_for_load_state("load")
        width = page.evaluate("document.documentElement.scrollWidth")
        if width > PHONE["width"]:
            too_wide[path] = width
        nav = page.locator("header.topbar nav")
        box, bar = nav.bounding_box(), page.locator("header.topbar").bounding_box()
        assert box["y"] + box["height"] <= bar["y"] + bar["height"] + 1, path  # on the dark bar
        screenshot(page, "phone-" + path.strip("/").replace("/", "-"))
    assert too_wide == {}
    desktop = log_in("olga")
    for path in PAGES:  # and each page as a desktop shows it, for the record
        desktop.goto(path)
        desktop.wait_for_load_state("load")
        screenshot(desktop, "desktop-" + path.strip("/").replace("/", "-"))
