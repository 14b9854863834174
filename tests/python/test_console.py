"""The web console in Debian's headless Chromium, driven through the system chromedriver
(selenium; nothing is downloaded at run time). A broker with a small cache, so that most
messages are paged out to the store, and a few thousand queues. The test logs in, opens the
queues page, opens a queue, browses its paged messages, moves one to another queue through
the move dialog, checks the result through the API, and checks that a monitoring user gets a
read-only console. Screenshots go to target/console-screenshots/."""

import json
import os
import pathlib
import socket
import subprocess
import tempfile
import time

import pika
import pytest
import requests
from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.common.exceptions import StaleElementReferenceException
from selenium.webdriver.common.by import By
from selenium.webdriver.support import expected_conditions as EC
from selenium.webdriver.support.ui import WebDriverWait

ROOT = pathlib.Path(__file__).resolve().parents[2]
SHOTS = ROOT / "target" / "console-screenshots"
QUEUES = 2000
MESSAGES = 400


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def small_broker():
    binary = os.environ.get("WARREN_BIN") or str(ROOT / "target" / "debug" / "warren")
    work = tempfile.mkdtemp(prefix="warren-console-")
    amqp, http = _free_port(), _free_port()
    log = open(os.path.join(work, "broker.log"), "wb")
    proc = subprocess.Popen(
        [binary, "--amqp-listen", "127.0.0.1:%d" % amqp, "--http-listen", "127.0.0.1:%d" % http,
         "--prometheus-listen", "", "--data-dir", os.path.join(work, "data"),
         "--cache-memory", "256KiB"],
        stdout=log, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 30
    while True:
        try:
            socket.create_connection(("127.0.0.1", http), timeout=0.2).close()
            break
        except OSError:
            assert proc.poll() is None, "warren exited"
            assert time.monotonic() < deadline, "warren did not start"
            time.sleep(0.05)
    yield amqp, "http://127.0.0.1:%d" % http
    proc.terminate()
    proc.wait(timeout=10)
    log.close()


@pytest.fixture(scope="module")
def browser():
    opts = webdriver.ChromeOptions()
    opts.binary_location = "/usr/bin/chromium"
    for a in ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
              "--disable-background-networking", "--disable-component-update", "--disable-sync",
              "--disable-dev-shm-usage", "--window-size=1440,1000",
              "--user-data-dir=" + tempfile.mkdtemp(prefix="warren-chromium-")]:
        opts.add_argument(a)
    driver = webdriver.Chrome(service=Service("/usr/bin/chromedriver"), options=opts)
    driver.set_page_load_timeout(30)
    yield driver
    driver.quit()


def _shot(driver, name):
    SHOTS.mkdir(parents=True, exist_ok=True)
    driver.save_screenshot(str(SHOTS / name))


def _login(driver, base, user, password):
    driver.get(base + "/#/login")
    driver.execute_script("sessionStorage.clear()")
    driver.get(base + "/#/login")
    wait = WebDriverWait(driver, 20)
    wait.until(EC.presence_of_element_located((By.ID, "username"))).send_keys(user)
    driver.find_element(By.ID, "password").send_keys(password)
    driver.find_element(By.ID, "login").click()
    wait.until(EC.presence_of_element_located((By.ID, "logout")))


def _setup(amqp_port):
    conn = pika.BlockingConnection(pika.ConnectionParameters("127.0.0.1", amqp_port))
    ch = conn.channel()
    for i in range(QUEUES):
        ch.queue_declare("load-%04d" % i)
    for q in ["console-src", "console-dst"]:
        ch.queue_declare(q, durable=True)
    ch.confirm_delivery()
    for n in range(MESSAGES):
        ch.basic_publish("", "console-src", json.dumps({"n": n, "pad": "x" * 600}),
                         pika.BasicProperties(delivery_mode=2, message_id="m-%d" % n,
                                              headers={"colour": "red" if n % 2 == 0 else "blue"}))
    conn.close()


def test_console_browse_and_move_through_the_browser(small_broker, browser):
    amqp_port, base = small_broker
    _setup(amqp_port)
    auth = ("guest", "guest")
    q = requests.get(base + "/api/queues/%2F/console-src", auth=auth).json()
    assert q["messages"] == MESSAGES
    assert q["messages_paged_out"] > 0, q

    _login(browser, base, "guest", "guest")
    wait = WebDriverWait(browser, 20, ignored_exceptions=[StaleElementReferenceException])
    wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#main .card") and d.find_elements(By.CSS_SELECTOR, ".u-wrap"))
    time.sleep(5.5)  # a second sample for the charts
    _shot(browser, "overview.png")

    # The queues page with a few thousand queues: paged by the server.
    browser.get(base + "/#/queues")
    wait.until(EC.presence_of_element_located((By.ID, "queues-table")))
    text = browser.find_element(By.ID, "main").text
    assert "of %s" % format(QUEUES + 2, ",") in text, text
    assert "Page 1 of" in text
    rows = browser.find_elements(By.CSS_SELECTOR, "#queues-table tr")
    assert len(rows) == 101  # the header and a page of 100
    _shot(browser, "queues.png")

    # The queue, its paged messages, a message's details.
    browser.get(base + "/#/queue/%2F/console-src")
    wait.until(EC.presence_of_element_located((By.CSS_SELECTOR, "#messages-table .message-row")))
    rows = browser.find_elements(By.CSS_SELECTOR, "#messages-table .message-row")
    assert len(rows) == 50
    assert rows[0].get_attribute("data-position") is not None
    # Page on until the messages come from the store.
    for _ in range(MESSAGES // 50):
        if browser.find_elements(By.XPATH, "//table[@id='messages-table']//span[text()='paged']"):
            break
        first = browser.find_element(By.CSS_SELECTOR, "#messages-table .message-row").get_attribute("data-position")
        browser.find_element(By.ID, "browse-next").click()
        wait.until(lambda d: d.find_element(By.CSS_SELECTOR, "#messages-table .message-row").get_attribute("data-position") != first)
    paged = browser.find_elements(By.XPATH, "//table[@id='messages-table']//span[text()='paged']")
    assert paged, "no paged message reached through the browser"
    row = paged[0].find_element(By.XPATH, "./ancestor::tr")
    position = int(row.get_attribute("data-position"))
    body = json.loads(requests.get(base + "/api/queues/%%2F/console-src/messages?from=%d&count=1" % position,
                                   auth=auth).json()["items"][0]["payload"])
    row.click()
    wait.until(lambda d: "Properties" in d.find_element(By.ID, "browser").text)
    browser.execute_script("arguments[0].scrollIntoView({block: 'center'})", row)
    _shot(browser, "queue-browser.png")

    # Move it with the dialog.
    row.find_element(By.CSS_SELECTOR, "input.pick").click()
    browser.find_element(By.ID, "move-selected").click()
    wait.until(EC.visibility_of_element_located((By.ID, "move-target"))).send_keys("console-dst")
    _shot(browser, "move-dialog.png")
    browser.find_element(By.ID, "move-confirm").click()
    wait.until(lambda d: "Done: 1" in d.find_element(By.ID, "flash").text)

    # Through the API: the message is in console-dst, once, and gone from console-src.
    dst = requests.get(base + "/api/queues/%2F/console-dst/messages", auth=auth).json()["items"]
    assert [json.loads(m["payload"])["n"] for m in dst] == [body["n"]]
    assert dst[0]["redelivered"] is False
    src = []
    cursor = 0
    while cursor is not None:
        page = requests.get(base + "/api/queues/%%2F/console-src/messages?from=%d&count=1000" % cursor,
                            auth=auth).json()
        src += [json.loads(m["payload"])["n"] for m in page["items"]]
        cursor = page["next"]
    assert src == [n for n in range(MESSAGES) if n != body["n"]]


def test_a_monitoring_user_gets_a_read_only_console(small_broker, browser):
    _, base = small_broker
    auth = ("guest", "guest")
    assert requests.put(base + "/api/users/console-watcher", auth=auth,
                        json={"password": "w", "tags": "monitoring"}).status_code in (201, 204)
    assert requests.put(base + "/api/permissions/%2F/console-watcher", auth=auth,
                        json={"configure": ".*", "write": ".*", "read": ".*"}).status_code in (201, 204)
    _login(browser, base, "console-watcher", "w")
    browser.get(base + "/#/queue/%2F/console-src")
    wait = WebDriverWait(browser, 20)
    wait.until(EC.presence_of_element_located((By.CSS_SELECTOR, "#messages-table .message-row")))
    assert "Read-only" in browser.find_element(By.ID, "main").text
    assert not browser.find_elements(By.ID, "move-selected")
    assert not browser.find_elements(By.CSS_SELECTOR, "input.pick")
    # Wrong password: the login page says so.
    browser.find_element(By.ID, "logout").click()
    wait.until(EC.presence_of_element_located((By.ID, "username"))).send_keys("console-watcher")
    browser.find_element(By.ID, "password").send_keys("nope")
    browser.find_element(By.ID, "login").click()
    wait.until(lambda d: "Login failed" in d.find_element(By.ID, "main").text)
