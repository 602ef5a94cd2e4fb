//! `crds/` holds exactly what `mailroom crd` prints.

#[test]
fn committed_crds_match_the_types() {
    let generated = mailroom::api::crd::to_yaml().expect("CRDs serialize");
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("crds/mailroom.dev.yaml");
    let committed = std::fs::read_to_string(&path).expect("crds/mailroom.dev.yaml exists");
    assert!(committed == generated, "crds/mailroom.dev.yaml is out of date: run `make crds` and commit it");
}

#[test]
fn crds_have_short_names_columns_and_status() {
    let crds = mailroom::api::crd::all();
    let find = |kind: &str| crds.iter().find(|c| c.spec.names.kind == kind).expect(kind);
    let em = find("EmailMessage");
    assert_eq!(em.spec.names.short_names.as_deref(), Some(&["em".to_string(), "email".to_string()][..]));
    let cols: Vec<_> =
        em.spec.versions[0].additional_printer_columns.as_ref().unwrap().iter().map(|c| c.name.as_str()).collect();
    assert_eq!(cols, ["Phase", "Profile", "Recipients", "Attempts", "Age"]);
    assert!(em.spec.versions[0].subresources.as_ref().unwrap().status.is_some());
    for kind in ["MailProfile", "ClusterMailProfile"] {
        let p = find(kind);
        let cols: Vec<_> =
            p.spec.versions[0].additional_printer_columns.as_ref().unwrap().iter().map(|c| c.name.as_str()).collect();
        assert_eq!(cols, ["Transport", "Ready", "Token Expires", "Age"], "{kind}");
    }
    assert_eq!(find("MailProfile").spec.names.short_names.as_deref(), Some(&["mp".to_string()][..]));
    assert_eq!(find("ClusterMailProfile").spec.names.short_names.as_deref(), Some(&["cmp".to_string()][..]));
    assert_eq!(find("ClusterMailProfile").spec.scope, "Cluster");
    let ar = find("AlertRoute");
    assert_eq!(ar.spec.names.short_names.as_deref(), Some(&["ar".to_string()][..]));
    assert_eq!(ar.spec.scope, "Namespaced");
    let cols: Vec<_> =
        ar.spec.versions[0].additional_printer_columns.as_ref().unwrap().iter().map(|c| c.name.as_str()).collect();
    assert_eq!(
        cols,
        ["Source", "Profile", "Ready", "Received", "Created", "Rejected", "Last", "Outcome", "URL", "Age"]
    );
    assert!(ar.spec.versions[0].subresources.as_ref().unwrap().status.is_some(), "the counts are status");
}
