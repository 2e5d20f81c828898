-- Auto-route chest radiographs to the CXR Screener (DICOM modality "screener" in orthanc.json).
--
-- Every instance Orthanc stores whose Modality is CR or DX is queued for a C-STORE to the screener as an
-- asynchronous Orthanc job, so a slow or absent screener never holds up the modality that sent the image.
-- A job that failed stays in /jobs (up to JobsHistorySize) and can be re-run with POST /jobs/{id}/resubmit;
-- the screener acknowledges a repeat of an instance it already holds without classifying it again.
--
-- Results the screener sends back (Comprehensive 3D SR, Modality SR; Secondary Capture, Modality OT) are
-- never routed back: they are not CR/DX, and anything that arrives from the screener's own AE title is
-- skipped whatever its modality, so a misconfiguration cannot make a loop.

local SCREENER_MODALITY = 'screener'      -- key in DicomModalities
local SCREENER_AET = 'CXRSCREENER'        -- the screener's pacs.calling_ae_title
local ROUTED_MODALITIES = { CR = true, DX = true }

function OnStoredInstance(instanceId, tags, metadata, origin)
  if origin ~= nil and origin['RequestOrigin'] == 'DicomProtocol' and origin['RemoteAet'] == SCREENER_AET then
    return  -- our own result coming back
  end
  local modality = tags['Modality']
  if modality == nil or not ROUTED_MODALITIES[modality] then
    return
  end
  -- (no numeric fields in the body: Lua numbers serialise as floats, which Orthanc refuses as integers)
  local answer = RestApiPost('/modalities/' .. SCREENER_MODALITY .. '/store', DumpJson({
    Resources = { instanceId },
    Synchronous = false
  }, true), true)
  local job = answer and ParseJson(answer)
  if job == nil or job['ID'] == nil then
    print('route-to-screener: could not queue instance ' .. instanceId)
    return
  end
  print('route-to-screener: queued job ' .. job['ID'] .. ' for instance ' .. instanceId)
end

print('route-to-screener: loaded, routing CR/DX to ' .. SCREENER_MODALITY)
