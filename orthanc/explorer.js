// MedSegAgent on the study page of the legacy Orthanc Explorer: a "Segment…" button, a
// "View in OHIF" link, and the study's MedSegAgent status under them (shown again each time the
// page is, from the node's jobs or, without the node, from the study's MedSegAgentStatus metadata).
// Loaded by medsegagent_plugin.py through orthanc.ExtendOrthancExplorer(), which prepends
// MEDSEGAGENT_DEFAULT_REQUEST and MEDSEGAGENT_OHIF_ROOT (null: no viewer). Orthanc Explorer uses
// jQuery 1.x and jQuery Mobile, hence .live() and 'pagebeforecreate'.

var MEDSEGAGENT_FINAL = ['delivered', 'failed', 'cancelled'];
var medSegAgentPolling = null;          // the study whose job is being followed

function MedSegAgentStatus(text, isError) {
  $('#medsegagent-status')
    .text(text)                         // .text(): node messages are never parsed as HTML
    .css('color', isError ? '#b00' : '#333')
    .show();
}

function MedSegAgentError(xhr) {
  try {
    return JSON.parse(xhr.responseText).error;
  } catch (e) {
    return 'HTTP ' + xhr.status;
  }
}

function MedSegAgentDescribe(job) {
  var text = 'MedSegAgent job ' + job.id.substring(0, 8) + ': ' + job.state;
  if (job.state === 'delivered') {
    return text + ' — the SEG series is in this study.';
  }
  return job.error ? text + ' — ' + job.error : text;
}

// Show what the plugin knows of this study: the node's newest job, else the recorded status.
function MedSegAgentShow(answer) {
  if (answer.jobs.length > 0) {
    var job = answer.jobs[0];
    MedSegAgentStatus(MedSegAgentDescribe(job), job.state === 'failed' || job.state === 'cancelled');
    return job;
  }
  var recorded = answer.recorded;
  if (recorded !== null) {
    var text = 'MedSegAgent: ' + recorded.state + (recorded.reason ? ' — ' + recorded.reason : '');
    if (answer.node_error) {
      text += ' (node: ' + answer.node_error + ')';
    }
    MedSegAgentStatus(text, recorded.state === 'failed' || recorded.state === 'skipped');
  }
  return null;
}

// Poll the node's jobs for this study (through the plugin) until a job not in `known` ends.
function MedSegAgentPoll(study, known, started) {
  if (medSegAgentPolling !== study) {
    return;                             // the page shows another study now
  }
  $.ajax({
    url: '../medsegagent/studies/' + study + '/jobs',
    dataType: 'json',
    cache: false,
    success: function (answer) {
      var job = null;
      for (var i = 0; i < answer.jobs.length; i++) {
        if (known.indexOf(answer.jobs[i].id) < 0) {
          job = answer.jobs[i];
          break;                          // newest first
        }
      }
      var seconds = Math.round((Date.now() - started) / 1000);
      if (answer.node_error) {
        MedSegAgentStatus('Job status unavailable: ' + answer.node_error, true);
        return;
      } else if (job === null) {
        MedSegAgentStatus('Sent to the node; waiting for the study to be complete… (' + seconds + ' s)');
      } else if (MEDSEGAGENT_FINAL.indexOf(job.state) >= 0) {
        MedSegAgentShow({ jobs: [job], recorded: null });
        if (job.state === 'delivered') {
          RefreshStudy();                 // Orthanc Explorer's own refresh of the series list
        }
        return;
      } else {
        MedSegAgentStatus(MedSegAgentDescribe(job) + '… (' + seconds + ' s)');
      }
      if (seconds < 3600) {
        setTimeout(function () { MedSegAgentPoll(study, known, started); }, 2000);
      }
    },
    error: function (xhr) {
      MedSegAgentStatus('Job status unavailable: ' + MedSegAgentError(xhr), true);
    }
  });
}

$('#study').live('pagebeforecreate', function () {
  var item = $('<li data-icon="search"><a href="#" id="medsegagent-segment">Segment…</a></li>');
  item.insertAfter($('#study-store').parent());
  if (MEDSEGAGENT_OHIF_ROOT !== null) {
    // rel="external": jQuery Mobile must not load the viewer into this page by Ajax.
    $('<li data-icon="grid"><a href="#" id="medsegagent-ohif" rel="external" target="_blank">View in OHIF</a></li>')
      .insertAfter(item);
  }
  $('<p id="medsegagent-status" style="display:none; padding: 0 1em; white-space: normal"></p>')
    .insertAfter(item.parent());
});

$('#study').live('pagebeforeshow', function () {
  var study = $.mobile.pageData.uuid;
  medSegAgentPolling = null;
  $('#medsegagent-status').hide().text('');
  $('#medsegagent-ohif').attr('href', '#');
  $.ajax({
    url: '../medsegagent/studies/' + study + '/jobs',
    dataType: 'json',
    cache: false,
    success: function (answer) {
      if (MEDSEGAGENT_OHIF_ROOT !== null) {
        $('#medsegagent-ohif').attr('href', '..' + MEDSEGAGENT_OHIF_ROOT + 'viewer?StudyInstanceUIDs=' +
                                    encodeURIComponent(answer.StudyInstanceUID));
      }
      var job = MedSegAgentShow(answer);
      if (job !== null && MEDSEGAGENT_FINAL.indexOf(job.state) < 0) {
        var known = $.map(answer.jobs.slice(1), function (j) { return j.id; });
        medSegAgentPolling = study;       // a job still running: follow it
        MedSegAgentPoll(study, known, job.created_at * 1000);
      }
    }
  });
});

$('#medsegagent-segment').live('click', function () {
  var study = $.mobile.pageData.uuid;
  var text = window.prompt('What should MedSegAgent segment in this study?', MEDSEGAGENT_DEFAULT_REQUEST);
  if (text === null || $.trim(text) === '') {
    return false;
  }
  MedSegAgentStatus('Writing the request SR and sending the study to the node…');
  $.ajax({
    url: '../medsegagent/segment',
    type: 'POST',
    contentType: 'application/json',
    dataType: 'json',
    data: JSON.stringify({ study: study, request: text }),
    success: function (answer) {
      RefreshStudy();                     // shows the request SR series
      medSegAgentPolling = study;
      MedSegAgentPoll(study, answer.known_jobs, Date.now());
    },
    error: function (xhr) {
      MedSegAgentStatus('Segment failed: ' + MedSegAgentError(xhr), true);
    }
  });
  return false;
});
