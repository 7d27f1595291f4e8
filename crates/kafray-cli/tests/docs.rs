//! The documentation against drift: what the README and docs/ say is checked against the code
//! that it describes (the worker flag table is checked in `src/main.rs`, beside the CLI).
mod common;

use std::collections::BTreeSet;
use std::path::Path;
use std::sync::Arc;

fn read(relative: &str) -> String {
    let path = common::repo_root().join(relative);
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// The README's second command is what CI runs (`.ci/run` calls the README's test command).
#[test]
fn the_readmes_test_command_is_the_one_ci_runs() {
    let readme = read("README.md");
    let blocks: Vec<&str> = readme.split("```sh\n").skip(1).map(|b| b.split("\n```").next().unwrap()).collect();
    assert!(blocks.len() >= 2, "the README opens with two commands");
    assert_eq!(blocks[0], "bash scripts/setup.sh && cargo run --release -- demo");
    let ci = read(".ci/run");
    assert!(ci.lines().any(|l| l == blocks[1]), "`.ci/run` does not run the README's test command {:?}", blocks[1]);
}

/// Every relative link of the README and docs/ leads to a file that exists.
#[test]
fn every_local_link_leads_somewhere() {
    let root = common::repo_root();
    let mut pages = vec![root.join("README.md"), root.join("bench/README.md")];
    pages.extend(std::fs::read_dir(root.join("docs")).unwrap().map(|e| e.unwrap().path()));
    let mut broken = Vec::new();
    for page in &pages {
        let text = std::fs::read_to_string(page).unwrap();
        for link in text.split("](").skip(1).filter_map(|rest| rest.split(')').next()) {
            let target = link.split('#').next().unwrap();
            if target.is_empty() || target.contains("://") {
                continue;
            }
            if !page.parent().unwrap().join(target).exists() {
                broken.push(format!("{}: {link}", page.display()));
            }
        }
    }
    assert!(broken.is_empty(), "broken links: {broken:#?}");
}

/// Every test that docs/reliability.md names as holding a guarantee exists.
#[test]
fn the_tests_the_reliability_page_names_exist() {
    let page = read("docs/reliability.md");
    let named: BTreeSet<&str> = page
        .split('`')
        .skip(1)
        .step_by(2)
        .filter(|w| w.split('_').count() >= 4 && !w.starts_with("kafray_"))
        .filter(|w| w.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_'))
        .collect();
    assert!(named.len() >= 30, "the page names its tests: {named:?}");
    let mut sources = String::new();
    collect_sources(&common::repo_root().join("crates"), &mut sources);
    let missing: Vec<_> = named
        .iter()
        .filter(|name| !sources.contains(&format!("fn {name}(")) && !sources.contains(&format!("def {name}(")))
        .collect();
    assert!(missing.is_empty(), "docs/reliability.md names tests that do not exist: {missing:?}");
}

fn collect_sources(dir: &Path, out: &mut String) {
    for entry in std::fs::read_dir(dir).unwrap().map(Result::unwrap) {
        let path = entry.path();
        let name = path.file_name().unwrap().to_string_lossy();
        if path.is_dir() && name != "target" && !name.starts_with('.') {
            collect_sources(&path, out);
        } else if name.ends_with(".rs") || name.ends_with(".py") {
            out.push_str(&std::fs::read_to_string(&path).unwrap());
        }
    }
}

/// docs/operations.md lists every metric a worker exports and every metric of the Ray
/// controller, by the name a scrape shows.
#[test]
fn the_operations_page_lists_every_metric() {
    let page = read("docs/operations.md");
    let registry = kafray::exporter::registry(Arc::new(kafray::metrics::Metrics::new()), vec![]);
    let mut text = String::new();
    prometheus_client::encoding::text::encode(&mut text, &registry).unwrap();
    let mut names: Vec<String> = text
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .map(|l| {
            let (name, kind) = l.split_once(' ').unwrap();
            if kind == "counter" {
                format!("{name}_total")
            } else {
                name.to_string()
            }
        })
        .collect();
    assert!(names.len() >= 20, "{names:?}");
    // The controller's (Python, prometheus_client): a Counter's samples end in _total.
    let controller = read("crates/kafray-py/python/kafray/ray/controller.py");
    for (kind, suffix) in [("prom.Gauge(\"", ""), ("prom.Counter(\"", "_total")] {
        for rest in controller.split(kind).skip(1) {
            names.push(format!("{}{suffix}", rest.split('"').next().unwrap()));
        }
    }
    assert!(names.iter().any(|n| n == "kafray_deployment_replacements_total"), "{names:?}");
    let missing: Vec<_> = names.iter().filter(|n| !page.contains(&format!("`{n}"))).collect();
    assert!(missing.is_empty(), "docs/operations.md does not list {missing:?}");
}
