//! Forwarding to PSPs: the real daemon sends requests with the card put in to a real HTTPS
//! server on loopback (the stand-in PSP, with a CA of its own), and the router gets the
//! answer with every card number masked.

use std::time::{Duration, Instant};

use cardvault::pki::Authority;
use cardvault::stub_psp::StubPsp;

use crate::support::*;

/// What the vault adds to every request to `acme`: never seen by the router.
const PSP_SECRET: &str = "Bearer sk_test_cardvault_f0rward_5ecret";

/// A vault with a `receivers` file, and the stand-in PSP it points at.
struct Forwarding {
    setup: Setup,
    psp: StubPsp,
    /// A port nothing listens on.
    closed: u16,
}

impl Forwarding {
    fn new(label: &str) -> Forwarding {
        let setup = Setup::new(label);
        let ca = Authority::new("stub PSP CA").unwrap();
        write(&setup.root().join("psp-ca.pem"), &ca.cert_pem());
        let cert = ca.server(&["localhost"]).unwrap();
        let psp = StubPsp::start(&cert.cert_pem, &cert.key_pem, 2).unwrap();
        write_private(&setup.root().join("acme.auth"), &format!("{PSP_SECRET}\n"));
        let closed = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let config = std::fs::read_to_string(&setup.config).unwrap();
        write(
            &setup.config,
            &format!("receivers = \"receivers.toml\"\n{config}"),
        );
        let forwarding = Forwarding { setup, psp, closed };
        forwarding.write_receivers(true);
        forwarding
    }

    /// The receivers file: `acme` (the PSP), `slow` (1 s timeout), `down` (nothing listens),
    /// `shop-a-only`, `public-roots` (no `ca`: the stub's certificate is not trusted),
    /// `internal` (no private networks), and `extra` unless `with_extra` is false.
    fn write_receivers(&self, with_extra: bool) {
        let port = self.psp.port();
        let closed = self.closed;
        let receiver = |name: &str, port: u16, more: &str| {
            format!(
                "[[receiver]]\nname = \"{name}\"\nurl = \"https://localhost:{port}\"\n\
                 paths = [\"/v1/payments\"]\nmethods = [\"POST\"]\nprojects = [\"*\"]\n{more}\n"
            )
        };
        let private = "ca = \"psp-ca.pem\"\nallow_private_network = true\n";
        let mut text = receiver(
            "acme",
            port,
            &format!("{private}headers = {{ Authorization = {{ file = \"acme.auth\" }}, \"X-Merchant\" = \"m_1\" }}\nunmasked_fields = [\"pspReference\"]\n"),
        );
        text += &receiver("slow", port, &format!("{private}timeout = \"1s\"\n"));
        text += &receiver("down", closed, private);
        text += &receiver("public-roots", port, "allow_private_network = true\n");
        text += &receiver("internal", port, "ca = \"psp-ca.pem\"\n");
        text += &receiver("shop-a-only", port, private)
            .replace("projects = [\"*\"]", "projects = [\"shop-a\"]");
        if with_extra {
            text += &receiver("extra", port, private);
        }
        write(&self.setup.root().join("receivers.toml"), &text);
    }

    fn audit(&self) -> Vec<serde_json::Value> {
        std::fs::read_to_string(self.setup.root().join("audit/audit.log"))
            .unwrap()
            .lines()
            .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
            .filter(|l| l["event"] == "card.forward")
            .collect()
    }
}

fn tokenize(router: &Client, pan: &str) -> String {
    let mut card = card_body(pan);
    card["cvc"] = "737".into();
    card["holder_name"] = "Ada Lovelace".into();
    let res = router.post("/v1/cards", &card);
    assert_eq!(res.status, 201, "{}", res.body);
    res.json()["id"].as_str().unwrap().to_owned()
}

fn payment(receiver: &str, token: &str) -> serde_json::Value {
    serde_json::json!({
        "receiver": receiver,
        "token": token,
        "method": "POST",
        "path": "/v1/payments",
        "headers": {"content-type": "application/json", "idempotency-key": "iv_123"},
        "body": {"amount": 1000, "description": "{{card.cvc}}", "card": {
            "number": "{{card.number}}", "exp_month": "{{card.exp_month | number}}",
            "exp_year": "{{card.exp_year}}", "cvc": "{{card.cvc}}", "name": "{{card.holder_name}}"}},
        "reason": "cit",
    })
}

#[test]
fn a_forward_sends_the_card_to_the_psp_and_masks_the_answer() {
    let f = Forwarding::new("forward-card");
    let daemon = f.setup.start();
    let router = f.setup.client(&daemon, &f.setup.router());
    let pan = test_pan(71);
    let token = tokenize(&router, &pan);

    let res = router.post("/v1/forward", &payment("acme", &token));
    assert_eq!(res.status, 200, "{}", res.body);
    // The PSP got the card, exactly, with the vault's credentials.
    let got = f.psp.received();
    assert_eq!(got.len(), 1);
    let sent = &got[0];
    assert_eq!(
        (sent.method.as_str(), sent.path.as_str()),
        ("POST", "/v1/payments")
    );
    let body: serde_json::Value = serde_json::from_slice(&sent.body).unwrap();
    assert_eq!(body["card"]["number"], pan.as_str());
    assert_eq!(body["card"]["exp_month"], 12);
    assert_eq!(body["card"]["exp_year"], future_year().to_string());
    assert_eq!(body["card"]["cvc"], "737");
    assert_eq!(body["card"]["name"], "Ada Lovelace");
    assert_eq!(body["amount"], 1000);
    assert_eq!(sent.header("authorization"), Some(PSP_SECRET));
    assert_eq!(sent.header("x-merchant"), Some("m_1"));
    assert_eq!(sent.header("idempotency-key"), Some("iv_123"));
    assert_eq!(
        sent.header("host"),
        Some(format!("localhost:{}", f.psp.port()).as_str())
    );

    // The router's answer: the PSP's, with the echoed card and credentials masked.
    let answer = res.json();
    assert_eq!(answer["status"], 201);
    assert!(
        !res.body.contains(&pan),
        "the PAN reached the router: {}",
        res.body
    );
    assert!(
        !res.body.contains("sk_test_cardvault"),
        "the PSP secret reached the router"
    );
    let echoed = &answer["body"]["received"];
    let last4 = &pan[12..];
    assert_eq!(
        echoed["body"]["card"]["number"],
        format!("************{last4}")
    );
    assert_eq!(echoed["body"]["card"]["cvc"], "***");
    // The CVC put in a field the PSP echoes is masked too.
    assert_eq!(body["description"], "737");
    assert_eq!(echoed["body"]["description"], "***");
    assert!(
        !res.body.contains("\"737\""),
        "the CVC reached the router: {}",
        res.body
    );
    assert_eq!(echoed["headers"]["authorization"], "[redacted]");
    assert_eq!(
        answer["headers"]["x-echo-number"],
        format!("************{last4}")
    );
    assert!(
        answer["headers"].get("set-cookie").is_none(),
        "{}",
        res.body
    );
    assert_eq!(answer["headers"]["content-type"], "application/json");

    // Used up: a second forward never reaches the PSP.
    let again = router.post("/v1/forward", &payment("acme", &token));
    assert_eq!(again.status, 409, "{}", again.body);
    assert_eq!(again.code(), "token_used");
    assert_eq!(again.json()["error"]["token_used"], false);
    assert_eq!(f.psp.count(), 1);

    // A customer token: reusable, no CVC (its field is left out), any number of times.
    let customer = router.post("/v1/customers", &serde_json::json!({"name": "Ada"}));
    let customer = customer.json()["id"].as_str().unwrap().to_owned();
    let source = tokenize(&router, &pan);
    let attached = router.post(
        &format!("/v1/customers/{customer}/tokens"),
        &serde_json::json!({"source": source}),
    );
    let stored = attached.json()["id"].as_str().unwrap().to_owned();
    for n in 2..=3 {
        let res = router.post("/v1/forward", &payment("acme", &stored));
        assert_eq!(res.status, 200, "{}", res.body);
        assert_eq!(f.psp.count(), n);
    }
    let body: serde_json::Value = serde_json::from_slice(&f.psp.received()[2].body).unwrap();
    assert_eq!(body["card"]["number"], pan.as_str());
    assert!(body["card"].get("cvc").is_none(), "{body}");

    // A form body, encoded as a form.
    let mut form = payment("acme", &stored);
    form["headers"]["content-type"] = "application/x-www-form-urlencoded".into();
    form["body"] = serde_json::json!({"card[number]": "{{card.number}}", "card[exp]": "{{card.exp_month}}/{{card.exp_year2}}", "amount": 1000});
    let res = router.post("/v1/forward", &form);
    assert_eq!(res.status, 200, "{}", res.body);
    let sent = String::from_utf8(f.psp.received()[3].body.to_vec()).unwrap();
    let year2 = future_year() % 100;
    assert_eq!(
        sent,
        format!("amount=1000&card%5Bexp%5D=12%2F{year2:02}&card%5Bnumber%5D={pan}")
    );
    assert!(!res.body.contains(&pan));

    // One audit line per forward: receiver, path, PSP status, sizes; no card, no secret.
    let lines = f.audit();
    assert_eq!(lines.len(), 5);
    let first = &lines[0]["forward"];
    assert_eq!(lines[0]["object"], token.as_str());
    assert_eq!(lines[0]["identity"], "router");
    assert_eq!(lines[0]["reason"], "cit");
    assert_eq!(first["receiver"], "acme");
    assert_eq!(first["method"], "POST");
    assert_eq!(first["path"], "/v1/payments");
    assert_eq!(first["status"], 201);
    assert_eq!(first["token_used"], true);
    assert!(first["sent"].as_u64().unwrap() > 50);
    assert!(first["received"].as_u64().unwrap() > 50);
    assert_eq!(lines[1]["code"], "token_used");
    assert_eq!(lines[2]["forward"]["token_used"], false);
    let output = daemon.stop();
    let audit = std::fs::read_to_string(f.setup.root().join("audit/audit.log")).unwrap();
    for (what, text) in [("audit log", &audit), ("daemon output", &output)] {
        assert!(!text.contains(&pan), "the PAN is in the {what}");
        assert!(
            !text.contains("sk_test_cardvault"),
            "the PSP secret is in the {what}"
        );
    }
}

#[test]
fn a_card_token_forwarded_32_times_at_once_reaches_the_psp_once() {
    let f = Forwarding::new("forward-race");
    let daemon = f.setup.start();
    let router = f.setup.client(&daemon, &f.setup.router());
    let token = tokenize(&router, &test_pan(72));
    let statuses: Vec<u16> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..32)
            .map(|_| {
                let (router, token) = (router.clone(), token.clone());
                s.spawn(move || router.post("/v1/forward", &payment("acme", &token)).status)
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    assert_eq!(
        statuses.iter().filter(|s| **s == 200).count(),
        1,
        "{statuses:?}"
    );
    assert!(
        statuses.iter().all(|s| *s == 200 || *s == 409),
        "{statuses:?}"
    );
    assert_eq!(f.psp.count(), 1);
    assert_eq!(f.audit().len(), 32);
}

#[test]
fn a_psp_that_is_down_leaves_the_token_and_one_that_times_out_uses_it() {
    let f = Forwarding::new("forward-faults");
    let daemon = f.setup.start();
    let router = f.setup.client(&daemon, &f.setup.router());
    let token = tokenize(&router, &test_pan(73));

    // Nothing listens: nothing was sent, the token is as it was.
    let down = router.post("/v1/forward", &payment("down", &token));
    assert_eq!(down.status, 502, "{}", down.body);
    assert_eq!(down.code(), "receiver_unreachable");
    assert_eq!(down.json()["error"]["token_used"], false);

    // The PSP reads the request and answers after the receiver's 1 s: the card went.
    let mut slow = payment("slow", &token);
    slow["headers"]["x-stub-delay-ms"] = "3000".into();
    let started = Instant::now();
    let res = router.post("/v1/forward", &slow);
    assert_eq!(res.status, 504, "{}", res.body);
    assert_eq!(res.code(), "receiver_timeout");
    assert_eq!(res.json()["error"]["token_used"], true);
    assert!(started.elapsed() < Duration::from_millis(2900));
    assert_eq!(f.psp.count(), 1);
    let again = router.post("/v1/forward", &payment("acme", &token));
    assert_eq!(again.code(), "token_used");
    assert_eq!(f.psp.count(), 1);

    let lines = f.audit();
    let codes: Vec<&str> = lines
        .iter()
        .map(|l| l["code"].as_str().unwrap_or(""))
        .collect();
    assert_eq!(
        codes,
        ["receiver_unreachable", "receiver_timeout", "token_used"]
    );
    assert_eq!(lines[1]["forward"]["token_used"], true);
    assert!(lines[1]["forward"].get("status").is_none());
}

#[test]
fn redirects_come_back_and_every_refusal_has_its_code_and_audit_line() {
    let f = Forwarding::new("forward-refusals");
    let daemon = f.setup.start();
    let router = f.setup.client(&daemon, &f.setup.router());
    let pan = test_pan(74);
    let token = tokenize(&router, &pan);
    let with = |change: &dyn Fn(&mut serde_json::Value)| {
        let mut request = payment("acme", &token);
        change(&mut request);
        router.post("/v1/forward", &request)
    };
    type Change = Box<dyn Fn(&mut serde_json::Value)>;
    let refusals: Vec<(u16, &str, Change)> = vec![
        (
            404,
            "receiver_not_found",
            Box::new(|r| r["receiver"] = "nobody".into()),
        ),
        (
            403,
            "receiver_path_not_allowed",
            Box::new(|r| r["path"] = "/v1/refunds".into()),
        ),
        (
            403,
            "receiver_method_not_allowed",
            Box::new(|r| r["method"] = "PUT".into()),
        ),
        (
            403,
            "receiver_project_not_allowed",
            Box::new(|r| r["receiver"] = "shop-a-only".into()),
        ),
        (
            422,
            "invalid_path",
            Box::new(|r| r["path"] = "/v1/payments/../admin".into()),
        ),
        (
            422,
            "invalid_header",
            Box::new(|r| r["headers"]["host"] = "evil.example".into()),
        ),
        (
            422,
            "invalid_placeholder",
            Box::new(|r| r["body"]["card"]["number"] = "{{card.pan}}".into()),
        ),
        (
            415,
            "unsupported_content_type",
            Box::new(|r| r["headers"]["content-type"] = "text/xml".into()),
        ),
        (
            502,
            "receiver_address_refused",
            Box::new(|r| r["receiver"] = "internal".into()),
        ),
        (
            502,
            "receiver_tls_failed",
            Box::new(|r| r["receiver"] = "public-roots".into()),
        ),
        (
            404,
            "not_found",
            Box::new(|r| r["token"] = "card_doesnotexist0000000000".into()),
        ),
    ];
    for (status, code, change) in &refusals {
        let res = with(change.as_ref());
        assert_eq!(
            (res.status, res.code().as_str()),
            (*status, *code),
            "{}",
            res.body
        );
        assert_eq!(res.json()["error"]["token_used"], false);
    }
    assert_eq!(f.psp.count(), 0, "a refused forward reached the PSP");

    // A caller without `forward`: 403, audited as a policy denial.
    let checkout = f.setup.client(&daemon, &f.setup.checkout());
    assert_eq!(
        checkout
            .post("/v1/forward", &payment("acme", &token))
            .status,
        403
    );

    // Too large an answer: 502, and the card went.
    let big = with(&|r| r["headers"]["x-stub-size"] = (2 << 20).to_string().into());
    assert_eq!(big.status, 502, "{}", big.body);
    assert_eq!(big.code(), "receiver_response_too_large");
    assert_eq!(big.json()["error"]["token_used"], true);

    // A redirect comes back as the PSP sent it, never followed.
    let other = tokenize(&router, &pan);
    let mut redirect = payment("extra", &other);
    redirect["headers"]["x-stub-status"] = "302".into();
    redirect["headers"]["x-stub-location"] = "https://elsewhere.example/3ds".into();
    let res = router.post("/v1/forward", &redirect);
    assert_eq!(res.status, 200, "{}", res.body);
    assert_eq!(res.json()["status"], 302);
    assert_eq!(
        res.json()["headers"]["location"],
        "https://elsewhere.example/3ds"
    );
    assert_eq!(f.psp.count(), 2);

    let lines = f.audit();
    assert_eq!(lines.len(), refusals.len() + 2);
    for ((_, code, _), line) in refusals.iter().zip(&lines) {
        assert_eq!(line["code"], *code);
        assert_eq!(line["outcome"], "failure");
    }
    // The refused path is not recorded; a refused receiver name is, when it is a name.
    assert_eq!(lines[0]["forward"]["receiver"], "nobody");
    assert_eq!(lines[4]["forward"]["path"], "");

    // A receiver removed from the file is refused at the next SIGHUP.
    f.write_receivers(false);
    hangup(&daemon);
    wait_for_log(&daemon, RELOADED, 1);
    let third = tokenize(&router, &pan);
    let gone = router.post("/v1/forward", &payment("extra", &third));
    assert_eq!(gone.code(), "receiver_not_found");
    assert_eq!(f.psp.count(), 2);
    assert_eq!(
        router.post("/v1/forward", &payment("acme", &third)).status,
        200
    );
}

#[test]
fn a_bad_receivers_file_stops_the_start_with_its_reason() {
    let f = Forwarding::new("forward-bad-file");
    let path = f.setup.root().join("receivers.toml");
    let good = std::fs::read_to_string(&path).unwrap();
    for (bad, reason) in [
        (
            good.replace("https://localhost", "http://localhost"),
            "must start with https://",
        ),
        (
            good.replace("https://localhost", "https://127.0.0.1"),
            "never an IP address",
        ),
        (good.replace("[\"POST\"]", "[\"CONNECT\"]"), "not one of"),
    ] {
        write(&path, &bad);
        let out = Daemon::try_start(&f.setup)
            .err()
            .expect("started with a bad receivers file");
        assert!(out.contains(reason), "{out}");
    }
    // A credential file others can read.
    write(&path, &good);
    std::fs::set_permissions(
        f.setup.root().join("acme.auth"),
        std::os::unix::fs::PermissionsExt::from_mode(0o644),
    )
    .unwrap();
    let out = Daemon::try_start(&f.setup)
        .err()
        .expect("started with an open credential file");
    assert!(out.contains("acme.auth is open to others"), "{out}");
}

#[test]
fn forwards_reuse_their_connection_to_the_psp() {
    let f = Forwarding::new("forward-pool");
    let daemon = f.setup.start();
    let router = f.setup.client(&daemon, &f.setup.router());
    let customer = router.post("/v1/customers", &serde_json::json!({"name": "Ada"}));
    let customer = customer.json()["id"].as_str().unwrap().to_owned();
    let source = tokenize(&router, &test_pan(75));
    let attached = router.post(
        &format!("/v1/customers/{customer}/tokens"),
        &serde_json::json!({"source": source}),
    );
    let stored = attached.json()["id"].as_str().unwrap().to_owned();
    let forward = |change: &dyn Fn(&mut serde_json::Value)| {
        let mut request = payment("acme", &stored);
        change(&mut request);
        let res = router.post("/v1/forward", &request);
        assert_eq!(res.status, 200, "{}", res.body);
        assert_eq!(res.json()["status"], 201, "{}", res.body);
    };
    for _ in 0..5 {
        forward(&|_| {});
    }
    assert_eq!(f.psp.count(), 5);
    assert_eq!(
        f.psp.connections(),
        1,
        "each forward opened its own connection"
    );
    // The PSP closes the connection after its answer: the next forward opens another.
    forward(&|r| r["headers"]["x-stub-close"] = "1".into());
    forward(&|_| {});
    assert_eq!(f.psp.connections(), 2);
    // A reload makes new receivers: their connections are new too.
    hangup(&daemon);
    wait_for_log(&daemon, RELOADED, 1);
    forward(&|_| {});
    assert_eq!(f.psp.connections(), 3);
    assert_eq!(f.psp.count(), 8);
}

#[test]
fn detokenization_limits_count_forwards() {
    let f = Forwarding::new("forward-limits");
    let policy = std::fs::read_to_string(&f.setup.policy).unwrap();
    write(
        &f.setup.policy,
        &format!(
            "{policy}\n[[identity]]\nname = \"slow-router\"\nuri_san = \"spiffe://cardvault.test/slow-router\"\n\
             permissions = [\"tokenize\", \"forward\"]\nprojects = [\"*\"]\n\
             detokenize_per_second = 0.1\ndetokenize_burst = 1\n"
        ),
    );
    let daemon = f.setup.start();
    let router = f
        .setup
        .client(&daemon, &f.setup.identity(&spec("slow-router")));
    let first = tokenize(&router, &test_pan(76));
    let second = tokenize(&router, &test_pan(77));
    assert_eq!(
        router.post("/v1/forward", &payment("acme", &first)).status,
        200
    );
    let refused = router.post("/v1/forward", &payment("acme", &second));
    assert_eq!(refused.status, 429, "{}", refused.body);
    assert_eq!(refused.code(), "rate_limited");
    assert_eq!(f.psp.count(), 1);
    let audit = std::fs::read_to_string(f.setup.root().join("audit/audit.log")).unwrap();
    assert!(
        audit.contains("\"event\":\"limit.detokenize\""),
        "the refusal is not audited"
    );
}
