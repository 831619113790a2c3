use candle_core::Device;
use realm_common::gguf::GgufFile;
use realm_common::model::Model;
use realm_tests::*;

fn greedy(model: &Model, prompt: &[u32], n: usize) -> Vec<u32> {
    let mut kv = model.new_session_kv();
    let mut out = vec![];
    let mut input = prompt.to_vec();
    for _ in 0..n {
        let t = std::time::Instant::now();
        let logits = model.forward(&input, &mut kv, false).unwrap();
        let v: Vec<f32> = logits.squeeze(0).unwrap().to_vec1().unwrap();
        let (id, _) = v.iter().enumerate().fold((0, f32::MIN), |a, (i, &x)| if x > a.1 { (i, x) } else { a });
        let mut s: Vec<(f32, usize)> = v.iter().enumerate().map(|(i, &x)| (x, i)).collect();
        s.sort_by(|a, b| b.0.partial_cmp(&a.0).unwrap());
        if std::env::var("SHOW").is_ok() { eprintln!("{} ms top {:?} {:?} margin {}", t.elapsed().as_millis(), s[0], s[1], s[0].0 - s[1].0); }
        out.push(id as u32);
        input = vec![id as u32];
    }
    out
}

#[test]
fn scratch() {
    for (m, f) in [("smollm2", SMOLLM2), ("gemma3", GEMMA3)] {
        let file = GgufFile::open(model_path(f)).unwrap();
        let t = std::time::Instant::now();
        let model = Model::load(&file, &Device::Cpu).unwrap();
        eprintln!("load {:?} {:?}", t.elapsed(), model.config);
        for (i, key) in ["t2", "t3", "t4", "t5"].iter().enumerate() {
            let ids = reference_ids(m, key);
            let out = greedy(&model, &ids, 16);
            let want: Vec<u32> = fixture("greedy.json")["runs"][m][i]["generated_ids"].as_array().unwrap().iter().map(|v| v.as_u64().unwrap() as u32).collect();
            eprintln!("{m} {key}: {} {out:?}", out == want);
        }
    }
}
