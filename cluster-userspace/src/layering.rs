//! The crate's layering, checked: no two sibling modules import each other, directly or around
//! a circle (`a` uses `b`, which uses `c`, which uses `a`). A parent and its children may use
//! each other (a child's items are the parent's parts); between siblings, dependencies point
//! one way, so each module can be read knowing only those below it.
//!
//! The check reads the sources: every `use` tree and every `crate::`/`super::` path outside
//! the test modules, each resolved to the deepest module it names, then lifted to the two
//! siblings under the modules' lowest common ancestor.

use std::{
    collections::{BTreeMap, BTreeSet},
    path::{Path, PathBuf},
};

type Module = Vec<String>;

/// Every module file under `src`, by module path (`lib.rs` and `main.rs` are the root).
fn modules(src: &Path) -> BTreeMap<Module, PathBuf> {
    let mut found = BTreeMap::new();
    let mut dirs = vec![src.to_path_buf()];
    while let Some(dir) = dirs.pop() {
        for entry in std::fs::read_dir(&dir).expect("reading src").flatten() {
            let path = entry.path();
            if path.is_dir() {
                dirs.push(path);
                continue;
            }
            if path.extension().is_none_or(|e| e != "rs") {
                continue;
            }
            let relative = path
                .strip_prefix(src)
                .expect("under src")
                .with_extension("");
            let mut module: Module = relative
                .iter()
                .map(|p| p.to_string_lossy().into_owned())
                .collect();
            if matches!(
                module.last().map(String::as_str),
                Some("mod" | "lib" | "main")
            ) {
                module.pop();
            }
            found.insert(module, path);
        }
    }
    found
}

/// The source without its test modules (`#[cfg(test)] mod tests { ... }` at the end).
fn without_tests(source: &str) -> &str {
    match source.find("#[cfg(test)]\nmod tests") {
        Some(at) => &source[..at],
        None => source,
    }
}

/// The paths a `use` tree names, braces expanded (`a::{b, c::{d, self}}`).
fn expand(tree: &str) -> Vec<String> {
    let tree = tree.trim();
    let (Some(open), Some(close)) = (tree.find('{'), tree.rfind('}')) else {
        return vec![tree.split(" as ").next().unwrap_or(tree).trim().to_string()];
    };
    let prefix = tree[..open].trim().trim_end_matches("::");
    let inner = tree.get(open + 1..close).unwrap_or_default();
    let mut parts = Vec::new();
    let (mut depth, mut current) = (0, String::new());
    for c in inner.chars() {
        match c {
            ',' if depth == 0 => parts.push(std::mem::take(&mut current)),
            '{' => {
                depth += 1;
                current.push(c);
            }
            '}' => {
                depth -= 1;
                current.push(c);
            }
            _ => current.push(c),
        }
    }
    parts.push(current);
    parts
        .iter()
        .filter(|p| !p.trim().is_empty())
        .flat_map(|p| expand(p))
        .map(|p| match p.as_str() {
            "self" => prefix.to_string(),
            _ => format!("{prefix}::{p}"),
        })
        .collect()
}

/// Every module path the source refers to (uses and inline paths).
fn references(source: &str) -> Vec<String> {
    let mut found = Vec::new();
    // `use` items start a line (after `pub`, `pub(crate)` or indentation); their tree runs to
    // the next `;`.
    let mut offset = 0;
    for line in source.split_inclusive('\n') {
        let trimmed = line.trim_start();
        let item = ["use ", "pub use ", "pub(crate) use ", "pub(super) use "]
            .iter()
            .find_map(|p| trimmed.strip_prefix(p));
        if item.is_some() {
            let start = offset + line.len() - trimmed.len();
            let tree = &source[start..];
            let tree = &tree[tree.find("use ").unwrap_or(0) + 4..];
            if let Some(end) = tree.find(';') {
                found.extend(expand(&tree[..end].replace('\n', " ")));
            }
        }
        offset += line.len();
    }
    for start in ["crate::", "super::"] {
        let mut rest = source;
        while let Some(at) = rest.find(start) {
            let path: String = rest[at..]
                .chars()
                .take_while(|c| c.is_alphanumeric() || *c == '_' || *c == ':')
                .collect();
            found.push(path.trim_end_matches(':').to_string());
            rest = &rest[at + start.len()..];
        }
    }
    found
}

/// The module `path` names, seen from `from`: its deepest prefix that is a module.
fn resolve(modules: &BTreeMap<Module, PathBuf>, from: &Module, path: &str) -> Option<Module> {
    let mut segments: Vec<&str> = path.split("::").collect();
    let mut base = match segments.first()? {
        &"crate" => Module::new(),
        &"super" | &"self" => from.clone(),
        _ => return None,
    };
    if segments[0] == "crate" || segments[0] == "self" {
        segments.remove(0);
    }
    while segments.first() == Some(&"super") {
        base.pop();
        segments.remove(0);
    }
    for segment in segments {
        let mut next = base.clone();
        next.push(segment.to_string());
        if !modules.contains_key(&next) {
            break;
        }
        base = next;
    }
    Some(base)
}

/// Sibling edges: (a, b) when something under sibling `a` uses something under sibling `b`.
fn sibling_edges(src: &Path) -> BTreeSet<(Module, Module)> {
    let modules = modules(src);
    let mut edges = BTreeSet::new();
    for (module, path) in &modules {
        let source = std::fs::read_to_string(path).expect("reading a module");
        for reference in references(without_tests(&source)) {
            let Some(target) = resolve(&modules, module, &reference) else {
                continue;
            };
            let common = module
                .iter()
                .zip(&target)
                .take_while(|(a, b)| a == b)
                .count();
            if common == module.len() || common == target.len() {
                continue; // the same module, an ancestor or a descendant
            }
            edges.insert((module[..=common].to_vec(), target[..=common].to_vec()));
        }
    }
    edges
}

/// The circles of the graph: its strongly connected components of more than one module.
fn circles(edges: &BTreeSet<(Module, Module)>) -> Vec<Vec<Module>> {
    let nodes: BTreeSet<&Module> = edges.iter().flat_map(|(a, b)| [a, b]).collect();
    let reaches = |from: &Module| {
        let mut seen = BTreeSet::new();
        let mut todo = vec![from.clone()];
        while let Some(node) = todo.pop() {
            for (a, b) in edges {
                if *a == node && seen.insert(b.clone()) {
                    todo.push(b.clone());
                }
            }
        }
        seen
    };
    let reach: BTreeMap<&Module, BTreeSet<Module>> =
        nodes.iter().map(|n| (*n, reaches(n))).collect();
    let mut circles: Vec<Vec<Module>> = Vec::new();
    for node in &nodes {
        if !reach[node].contains(*node) || circles.iter().any(|c| c.contains(node)) {
            continue;
        }
        let circle = nodes
            .iter()
            .filter(|other| reach[node].contains(**other) && reach[**other].contains(*node))
            .map(|other| (*other).clone())
            .collect();
        circles.push(circle);
    }
    circles
}

#[test]
fn no_module_imports_its_siblings_in_a_circle() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let edges = sibling_edges(&src);
    assert!(edges.len() > 20, "the graph looks wrong: {edges:?}");
    let found: Vec<String> = circles(&edges)
        .iter()
        .map(|c| {
            c.iter()
                .map(|m| m.join("::"))
                .collect::<Vec<_>>()
                .join(" <-> ")
        })
        .collect();
    assert!(found.is_empty(), "import circles: {found:#?}");
}

#[test]
fn the_checker_sees_a_circle_and_use_trees() {
    let edges: BTreeSet<(Module, Module)> = [("a", "b"), ("b", "c"), ("c", "a"), ("c", "d")]
        .iter()
        .map(|(a, b)| (vec![a.to_string()], vec![b.to_string()]))
        .collect();
    assert_eq!(circles(&edges).len(), 1);
    assert_eq!(circles(&edges)[0].len(), 3);
    assert_eq!(
        expand("crate::{a::{b, self}, c as d}"),
        ["crate::a::b", "crate::a", "crate::c"]
    );
}

#[test]
fn the_crate_root_has_at_most_eight_files_besides_lib_and_main() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let files: Vec<String> = std::fs::read_dir(&src)
        .expect("src")
        .flatten()
        .filter(|e| e.path().is_file())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n != "lib.rs" && n != "main.rs")
        .collect();
    assert!(files.len() <= 8, "{files:?}: layers belong in folders");
}
