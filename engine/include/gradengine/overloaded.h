// The overload set std::visit dispatches a closed set of kinds to (a LayerOp, an optimizer's
// options, ...):
//
//   std::visit(gradengine::Overloaded{
//                  [](const Conv2dSpec& conv) { ... },
//                  [](const LinearSpec& linear) { ... }, ...},
//              layer.op);
//
// A kind the lambdas do not handle fails to compile.

#ifndef GRADENGINE_OVERLOADED_H_
#define GRADENGINE_OVERLOADED_H_

namespace gradengine {

template <typename... Ts>
struct Overloaded : Ts... {
  using Ts::operator()...;
};
template <typename... Ts>
Overloaded(Ts...) -> Overloaded<Ts...>;

}  // namespace gradengine

#endif  // GRADENGINE_OVERLOADED_H_
