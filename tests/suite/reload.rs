//! Certificate revocation and `SIGHUP`: a revoked client certificate fails the handshake, a
//! reload takes new CRLs and policies without dropping established connections, and a bad
//! reload changes nothing.
use crate::support::*;

/// Adds `crl = "crl.pem"` to the config's `[tls]` (the file itself is the test's to write).
fn turn_on_crl(setup: &Setup) {
    let config = std::fs::read_to_string(&setup.config).unwrap().replace(
        "client_ca = \"ca.pem\"\n",
        "client_ca = \"ca.pem\"\ncrl = \"crl.pem\"\n",
    );
    write(&setup.config, &config);
}

#[test]
fn revoked_certificates_fail_the_handshake_before_and_after_a_reload() {
    let setup = Setup::new("crl");
    turn_on_crl(&setup);
    let crl = setup.root().join("crl.pem");
    let early = setup.router();
    let late = setup.router();
    let other = setup.router();
    // Revoked before the start.
    write(&crl, &setup.ca.crl(&[&early.serial]).unwrap());
    let daemon = setup.start();
    let health = |who: &Identity| {
        setup
            .client(&daemon, who)
            .send("GET", "/v1/health", &[], None)
    };
    assert!(health(&early).is_err(), "a revoked certificate got through");
    // The failed handshake is a log line naming the peer and the reason.
    wait_for_log(&daemon, "TLS handshake failed peer=127.0.0.1:", 1);
    wait_for_log(&daemon, "reason=\"client certificate revoked\"", 1);
    assert_eq!(health(&late).unwrap().status, 200);
    assert_eq!(health(&other).unwrap().status, 200);

    // Connections made now stay open across the reload; the one whose certificate the
    // reload revokes is refused every request from then on.
    let established = setup.client(&daemon, &late).connect().unwrap();
    let established_other = setup.client(&daemon, &other).connect().unwrap();
    let established_health = setup.client(&daemon, &late).connect().unwrap();
    write(&crl, &setup.ca.crl(&[&early.serial, &late.serial]).unwrap());
    hangup(&daemon);
    wait_for_log(&daemon, RELOADED, 1);
    assert!(
        health(&late).is_err(),
        "revoked by the reload, still accepted"
    );
    assert!(health(&early).is_err());
    assert_eq!(health(&other).unwrap().status, 200);
    let unknown_card = "/v1/cards/card_00000000000000000000000000000000";
    let res = established_other
        .send("GET", unknown_card, &[], None)
        .unwrap();
    assert_eq!(
        res.status, 404,
        "the reload broke an established connection"
    );
    let res = established.send("GET", unknown_card, &[], None).unwrap();
    assert_eq!(
        (res.status, res.code()),
        (403, "forbidden".into()),
        "a certificate revoked by the reload still works on its open connection"
    );
    let res = established_health
        .send("GET", "/v1/health", &[], None)
        .unwrap();
    assert_eq!(
        res.status, 403,
        "health answered a certificate revoked by the reload"
    );

    // A bad reload (a broken CRL, then a broken policy) keeps what was in force.
    write(&crl, "not a CRL");
    hangup(&daemon);
    wait_for_log(&daemon, "reload refused", 1);
    assert!(health(&late).is_err());
    assert_eq!(health(&other).unwrap().status, 200);
    write(&crl, &setup.ca.crl(&[&early.serial, &late.serial]).unwrap());
    write(&setup.policy, &POLICY.replace("\"keys\"", "\"godmode\""));
    hangup(&daemon);
    wait_for_log(&daemon, "reload refused", 2);
    assert!(daemon.output().contains("unknown permission"));
    assert_eq!(health(&other).unwrap().status, 200);

    // A good policy reload takes effect: checkout may now detokenize.
    write(
        &setup.policy,
        &POLICY.replace(
            "uri_san = \"spiffe://cardvault.test/checkout\"\npermissions = [\"tokenize\", \"read\"]",
            "uri_san = \"spiffe://cardvault.test/checkout\"\npermissions = [\"tokenize\", \"read\", \"detokenize\"]",
        ),
    );
    let checkout = setup.client(&daemon, &setup.checkout());
    let card = checkout.post("/v1/cards", &card_body(&test_pan(1))).json()["id"]
        .as_str()
        .unwrap()
        .to_owned();
    let detok = serde_json::json!({"token": card});
    assert_eq!(checkout.post("/v1/detokenize", &detok).status, 403);
    hangup(&daemon);
    wait_for_log(&daemon, RELOADED, 2);
    assert_eq!(checkout.post("/v1/detokenize", &detok).status, 200);
    daemon.stop();

    let audit = std::fs::read_to_string(setup.root().join("audit/audit.log")).unwrap();
    assert_eq!(audit.matches("\"event\":\"daemon.reload\"").count(), 4);
    assert_eq!(audit.matches("no longer trusted after a reload").count(), 1);
}

/// Revocation turned on by a reload: the config file is read again on `SIGHUP`, so a `crl`
/// added to `[tls]` takes effect without a restart.
#[test]
fn a_crl_added_to_the_config_takes_effect_on_reload() {
    let setup = Setup::new("crl-on");
    let daemon = setup.start();
    let revoked = setup.router();
    let kept = setup.router();
    let health = |who: &Identity| {
        setup
            .client(&daemon, who)
            .send("GET", "/v1/health", &[], None)
    };
    assert_eq!(health(&revoked).unwrap().status, 200);
    write(
        &setup.root().join("crl.pem"),
        &setup.ca.crl(&[&revoked.serial]).unwrap(),
    );
    turn_on_crl(&setup);
    hangup(&daemon);
    wait_for_log(&daemon, RELOADED, 1);
    assert!(
        health(&revoked).is_err(),
        "the CRL added by the reload was not used"
    );
    assert_eq!(health(&kept).unwrap().status, 200);
}

/// A CRL whose next update is days away is a warning in the log from the start (and once a
/// day after), naming it and the days left.
#[test]
fn a_crl_close_to_its_next_update_is_a_warning_at_start() {
    let setup = Setup::new("crl-soon");
    let crl = setup.root().join("crl.pem");
    let soon = time::OffsetDateTime::now_utc() + time::Duration::days(5) + time::Duration::hours(1);
    write(&crl, &setup.ca.crl_until(&[], soon).unwrap());
    turn_on_crl(&setup);
    let daemon = setup.start();
    wait_for_log(&daemon, "TLS material runs out soon", 1);
    let line = daemon
        .output()
        .lines()
        .find(|l| l.contains("TLS material runs out soon"))
        .unwrap()
        .to_owned();
    assert!(
        line.contains("CRL of") && line.contains("days_left=5"),
        "{line}"
    );
    // The server certificate (90 days) and the CA (a year) are not close: no line for them.
    assert!(!daemon.output().contains("what=server certificate"));
}

/// A whole second `seconds` from now: certificate and CRL times have no fraction.
fn whole_seconds_from_now(seconds: i64) -> time::OffsetDateTime {
    let now = time::OffsetDateTime::now_utc().unix_timestamp();
    time::OffsetDateTime::from_unix_timestamp(now + seconds).unwrap()
}

fn sleep_until(at: time::OffsetDateTime) {
    let left = at - time::OffsetDateTime::now_utc();
    if left.is_positive() {
        std::thread::sleep(left.unsigned_abs());
    }
}

/// Waits on an open session until a second past `refused_from`, the first moment the daemon
/// must refuse it. A request 1.5 s before that moment keeps the connection from idling out
/// (actix closes one idle for 5 s), and must be answered if it was answered in time.
fn idle_past(session: &mut Session, refused_from: time::OffsetDateTime) {
    sleep_until(refused_from - time::Duration::milliseconds(1500));
    let status = session.get("/v1/health").status;
    if time::OffsetDateTime::now_utc() < refused_from {
        assert_eq!(status, 200, "refused before its deadline");
    }
    sleep_until(refused_from + time::Duration::seconds(1));
}

/// A keep-alive connection is refused once the CRL in force passes its nextUpdate, as a new
/// handshake is (the verifier enforces CRL expiry), with no reload to prompt a check.
#[test]
fn an_open_connection_is_refused_once_the_crl_expires() {
    let setup = Setup::new("crl-expiry");
    turn_on_crl(&setup);
    let crl = setup.root().join("crl.pem");
    write(&crl, &setup.ca.crl(&[]).unwrap());
    let daemon = setup.start();
    // The short-lived CRL comes by reload, so that however long the start took, the test
    // still has its few seconds.
    let next_update = whole_seconds_from_now(4);
    write(&crl, &setup.ca.crl_until(&[], next_update).unwrap());
    hangup(&daemon);
    wait_for_log(&daemon, RELOADED, 1);

    let router = setup.router();
    let mut session = setup.client(&daemon, &router).session();
    let card = "/v1/cards/card_00000000000000000000000000000000";
    assert_eq!(session.get("/v1/health").status, 200);
    assert_eq!(session.get(card).status, 404);
    assert!(
        time::OffsetDateTime::now_utc() < next_update,
        "the CRL expired before the first requests: the test ran too slowly to mean anything"
    );

    // webpki refuses a CRL from its nextUpdate on.
    idle_past(&mut session, next_update);
    assert_eq!(
        session.get("/v1/health").status,
        403,
        "health answered on a connection whose CRL expired"
    );
    let res = session.get(card);
    assert_eq!(
        (res.status, res.code()),
        (403, "forbidden".into()),
        "a connection whose CRL expired still works"
    );
    assert!(
        setup
            .client(&daemon, &router)
            .send("GET", "/v1/health", &[], None)
            .is_err(),
        "a handshake under an expired CRL was accepted"
    );
    assert!(!daemon.output().contains("panicked"));
}

/// A keep-alive connection whose client chain runs through an intermediate (the client sends
/// leaf and intermediate, `client_ca` holds the root alone) is refused once that intermediate
/// expires, although its leaf is still valid.
#[test]
fn an_open_connection_is_refused_once_its_intermediate_expires() {
    let setup = Setup::new("intermediate-expiry");
    let daemon = setup.start();
    let not_after = whole_seconds_from_now(3);
    let intermediate = setup
        .ca
        .intermediate("cardvault test intermediate", not_after)
        .unwrap();
    let router = issue(&intermediate, &spec("router"), setup.root());
    assert_eq!(
        std::fs::read_to_string(&router.cert)
            .unwrap()
            .matches("BEGIN CERTIFICATE")
            .count(),
        2,
        "the client sends leaf and intermediate"
    );

    let mut session = setup.client(&daemon, &router).session();
    let card = "/v1/cards/card_00000000000000000000000000000000";
    assert_eq!(session.get("/v1/health").status, 200);
    assert_eq!(session.get(card).status, 404);
    assert!(
        time::OffsetDateTime::now_utc() < not_after,
        "the intermediate expired before the first requests: the test ran too slowly to mean anything"
    );

    // webpki refuses a certificate from the second after its notAfter.
    idle_past(&mut session, not_after + time::Duration::seconds(1));
    assert_eq!(
        session.get("/v1/health").status,
        403,
        "health answered on a connection whose intermediate expired"
    );
    let res = session.get(card);
    assert_eq!(
        (res.status, res.code()),
        (403, "forbidden".into()),
        "a connection whose intermediate expired still works"
    );
    assert!(
        setup
            .client(&daemon, &router)
            .send("GET", "/v1/health", &[], None)
            .is_err(),
        "a handshake through an expired intermediate was accepted"
    );
    assert!(!daemon.output().contains("panicked"));
}
