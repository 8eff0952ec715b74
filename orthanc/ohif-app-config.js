/** @type {AppTypes.Config} */
// OHIF Viewer 3 (npm @ohif/app 3.13.2) served by Orthanc's ServeFolders plugin at /ohif/,
// reading studies from Orthanc's DICOMweb plugin on the same origin (Orthanc 1.10 sends no CORS
// headers, so the viewer must not live on another port). orthanc/prepare-ohif.py copies this
// file over the package's own app-config.js, whose data source is a public demo server:
// nothing here reaches beyond this Orthanc.
const orthanc = window.location.origin;

window.config = {
  name: 'medsegagent-orthanc',
  routerBasename: '/ohif',
  extensions: [],
  modes: [],
  customizationService: {},
  showStudyList: true,
  maxNumberOfWebWorkers: 3,
  showWarningMessageForCrossOrigin: false,
  showCPUFallbackMessage: true,
  showLoadingIndicator: true,
  strictZSpacingForVolumeViewport: true,
  // Orthanc 1.10 answers one request per HTTP thread: keep the browser from queueing hundreds.
  maxNumRequests: { interaction: 100, thumbnail: 5, prefetch: 10 },
  showErrorDetails: 'always',
  defaultDataSourceName: 'orthanc',
  dataSources: [
    {
      namespace: '@ohif/extension-default.dataSourcesModule.dicomweb',
      sourceName: 'orthanc',
      configuration: {
        friendlyName: 'This Orthanc (DICOMweb plugin)',
        name: 'orthanc',
        wadoUriRoot: orthanc + '/wado',
        qidoRoot: orthanc + '/dicom-web',
        wadoRoot: orthanc + '/dicom-web',
        // Orthanc's QIDO-RS ignores includefield; it returns the main tags it indexes.
        qidoSupportsIncludeField: false,
        supportsReject: false,
        imageRendering: 'wadors',
        thumbnailRendering: 'wadors',
        enableStudyLazyLoad: true,
        supportsFuzzyMatching: false,
        supportsWildcard: true,
        staticWado: false,
        singlepart: 'bulkdata,video',
        bulkDataURI: { enabled: true, relativeResolution: 'studies' },
        omitQuotationForMultipartRequest: true,
      },
    },
  ],
};
