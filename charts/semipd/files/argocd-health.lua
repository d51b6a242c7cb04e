-- Argo CD health check for semipd.io/SemiPDService. Install it under the key
-- resource.customizations.health.semipd.io_SemiPDService of the argocd-cm ConfigMap (docs/operator.md).
-- It reads what the operator writes for kstatus: a spec it has not observed yet, or Reconciling=True, is
-- Progressing; Stalled=True (a spec that cannot be applied, a name held by someone else, RBAC, a rollout past
-- its deadline) is Degraded; Ready=True is Healthy; zero replicas is Suspended.
local hs = {status = "Progressing", message = "waiting for the operator to observe this generation"}
if obj.status == nil or obj.status.observedGeneration == nil then
  return hs
end
if obj.metadata.generation ~= nil and obj.status.observedGeneration ~= obj.metadata.generation then
  return hs
end
local conditions = {}
if obj.status.conditions ~= nil then
  for _, c in ipairs(obj.status.conditions) do
    conditions[c.type] = c
  end
end
local function say(c)
  return (c.reason or "") .. ": " .. (c.message or "")
end
local stalled, reconciling, ready = conditions["Stalled"], conditions["Reconciling"], conditions["Ready"]
if stalled ~= nil and stalled.status == "True" then
  hs.status = "Degraded"
  hs.message = say(stalled)
  return hs
end
if reconciling ~= nil and reconciling.status == "True" then
  hs.message = say(reconciling)
  return hs
end
if ready ~= nil and ready.status == "True" then
  hs.status = "Healthy"
  hs.message = say(ready)
  return hs
end
if ready ~= nil and ready.reason == "ScaledToZero" then
  hs.status = "Suspended"
  hs.message = say(ready)
  return hs
end
if ready ~= nil then
  hs.message = say(ready)
end
return hs
