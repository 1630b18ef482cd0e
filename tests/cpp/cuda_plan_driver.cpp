// Runs the CUDA launch decisions (csrc/cuda/kd_cuda.h, plain C++) on described layouts,
// for tests/test_cuda_plan.py: no GPU, no CUDA runtime library, only its headers.
//
// One query per input line, `key=value` words (defaults in parentheses):
//   V N (4) s_addr (0) s_stride (V) s_type (bf16) t_addr (0) t_stride (V) t_type (s_type)
//   grad=alloc|inplace|none|ADDR (alloc) g_stride (for an ADDR) stats (0) cluster_device (1)
//   force=auto|twopass|cluster (auto) launchable (1)
//   multi (0: the several-teachers plan, plan_multi, of teacher t and, given t1_addr or
//   t1_stride, a second teacher t1 of the same dtype)
// Addresses are byte addresses (only their value mod 16 matters). grad=alloc is the layout
// op_empty_grad gives the student. One output line per query:
//   kind=twopass|cluster C= vec= threads= t_part= g_part= g_offset= g_stride= refused=<why|->
//   (multi: kind=multi, and built= whether the kernel is built for the dtype pair)
#include <cstdlib>
#include <iostream>
#include <map>
#include <sstream>
#include <string>

#include "cuda/kd_cuda.h"

using namespace fastkd::cuda;

static ElemType parse_type(const std::string& s) {
  if (s == "f32") return ElemType::F32;
  if (s == "bf16") return ElemType::BF16;
  if (s == "f16") return ElemType::F16;
  std::cerr << "unknown dtype " << s << "\n";
  std::exit(2);
}

int main() {
  std::string line;
  while (std::getline(std::cin, line)) {
    if (line.empty()) continue;
    std::map<std::string, std::string> kv;
    std::istringstream words(line);
    for (std::string w; words >> w;) {
      const auto eq = w.find('=');
      kv[w.substr(0, eq)] = eq == std::string::npos ? "1" : w.substr(eq + 1);
    }
    const auto get = [&](const char* k, const std::string& dflt) { return kv.count(k) ? kv[k] : dflt; };
    const auto num = [&](const char* k, long long dflt) { return std::stoll(get(k, std::to_string(dflt))); };
    const int64_t V = num("V", 0), n = num("N", 4);
    const ElemType st = parse_type(get("s_type", "bf16"));
    const ElemType tt = parse_type(get("t_type", get("s_type", "bf16")));
    PlanInput in{};
    in.vocab_size = V;
    in.n_rows = n;
    in.s = RowLayout{num("s_addr", 0) & 15, num("s_stride", V), st};
    in.t = RowLayout{num("t_addr", 0) & 15, num("t_stride", V), tt};
    const std::string grad = get("grad", "alloc");
    GradAlloc ga{0, 0};
    in.has_grad = grad != "none";
    if (grad == "alloc") {
      ga = grad_alloc(in.s, n, num("cols", V));
      in.g = RowLayout{(ga.offset * elem_bytes(st)) & 15, ga.stride, st};  // the allocator aligns to 512 B
    } else if (grad == "inplace") {
      in.g = in.s;
    } else if (grad != "none") {
      in.g = RowLayout{std::stoll(grad) & 15, num("g_stride", V), st};
    }
    in.stats_given = num("stats", 0) != 0;
    in.cluster_device = num("cluster_device", 1) != 0;
    const std::string force = get("force", "auto");
    in.force = force == "cluster" ? KernelOverride::Cluster : force == "twopass" ? KernelOverride::TwoPass
                                                                                : KernelOverride::Auto;
    if (num("multi", 0) != 0) {  // the several-teachers plan: teacher t, and t1 when t1_addr or t1_stride is given
      const RowLayout ts[2] = {in.t, RowLayout{num("t1_addr", 0) & 15, num("t1_stride", V), tt}};
      const int k = kv.count("t1_addr") || kv.count("t1_stride") ? 2 : 1;
      const MultiPlan m = plan_multi(V, n, in.s, ts, k, in.g);
      std::cout << "kind=multi C=1 vec=" << m.vec << " threads=" << m.threads << " t_part=" << m.t_part
                << " g_part=" << m.g_part << " g_offset=" << ga.offset << " g_stride=" << ga.stride
                << " built=" << multi_teacher_type_built(st, tt) << " asked=0 refused=-\n";
      continue;
    }
    const bool launchable = num("launchable", 1) != 0;
    int asked = 0;
    const LaunchPlan p = choose_plan(in, [&](const LaunchPlan&) { ++asked; return launchable; });
    std::cout << "kind=" << (p.kind == KernelKind::Cluster ? "cluster" : "twopass") << " C=" << p.cluster
              << " vec=" << p.vec << " threads=" << p.threads << " t_part=" << p.t_part << " g_part=" << p.g_part
              << " g_offset=" << ga.offset << " g_stride=" << ga.stride << " asked=" << asked
              << " refused=" << (p.refused ? p.refused : "-") << "\n";
  }
  return 0;
}
