//! End-to-end through the public API only: prepare -> load -> sample -> decode.

use fabbrica_data::{load, prepare, DataError, Sampler, Split, TokenizerSpec};

#[test]
fn prepare_load_sample_decode() {
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("input.txt");
    let text = "It is a truth universally acknowledged, that a single man in possession \
                of a good fortune, must be in want of a wife.\n"
        .repeat(8);
    std::fs::write(&input, &text).unwrap();

    for kind in &TokenizerSpec::BUILTIN {
        let out = dir.path().join(kind.kind().as_str());
        let summary = prepare(&input, kind, &out, 0.1).unwrap();
        let ds = load(&out, &TokenizerSpec::Char, 8, 0.1).unwrap();
        assert_eq!(ds.tokenizer.kind(), kind.kind());
        assert_eq!(ds.tokenizer.vocab_size(), summary.vocab_size);

        let (b, t) = (3, 8);
        let (x, y) = Sampler::new(0).batch(&ds.train, Split::Train, 0, 0, b, t);
        assert_eq!((x.len(), y.len()), (b * t, b * t));
        for r in 0..b {
            // y is x shifted by one within the row: x[r, 1..] == y[r, ..t-1].
            assert_eq!(x[r * t + 1..(r + 1) * t], y[r * t..(r + 1) * t - 1]);
            let ids: Vec<u32> = x[r * t..(r + 1) * t].iter().map(|&i| i as u32).collect();
            // Every sampled window decodes to text found in the corpus
            // (char always; gpt2 windows of whole tokens too).
            assert!(text.contains(&ds.tokenizer.decode(&ids)));
        }
    }
}

#[test]
fn error_lines_are_single_and_actionable() {
    let dir = tempfile::tempdir().unwrap();
    let tiny = dir.path().join("tiny.txt");
    std::fs::write(&tiny, "hello world").unwrap();
    let errors: Vec<DataError> = vec![
        load(&dir.path().join("missing"), &TokenizerSpec::Char, 8, 0.1).unwrap_err(),
        load(&tiny, &TokenizerSpec::Char, 64, 0.1).unwrap_err(),
        load(dir.path(), &TokenizerSpec::Char, 8, 0.1).unwrap_err(), // dir without meta.json
        "sentencepiece".parse::<TokenizerSpec>().unwrap_err(),
        load(&tiny, &TokenizerSpec::Char, 2, 1.0).unwrap_err(),
        load(&tiny, &TokenizerSpec::Hf(dir.path().join("no/tokenizer.json")), 2, 0.1).unwrap_err(),
        load(&tiny, &TokenizerSpec::Hf(tiny.clone()), 2, 0.1).unwrap_err(), // not JSON
    ];
    for e in errors {
        let line = e.to_string();
        println!("{line}");
        assert!(!line.contains('\n') && !line.is_empty());
    }
}
